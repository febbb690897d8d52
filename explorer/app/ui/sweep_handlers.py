"""The Edit tab's layer sweep: the request's edit at each layer, drawn beside the trace's MLP effect as it comes."""
from __future__ import annotations

import gradio as gr

from ...editing import make_request
from ...editing.edits import EditSession
from ...studies.compare import Probes
from ...studies.sweep import parse_layers, sweep_layers
from ...tracing import TraceOptions
from ...tracing import validate_options as validate_trace_options
from .. import plots
from ..scheduler import FIRST_SHOWN, MAIN_SHOWN
from . import config
from .errors import user_errors
from .inputs import check_lengths, edit_options, prompt_lines, trace_options
from .jobs import JobReport, streamed
from .sessions import Workspace

SWEEP_HEADERS = ["layer", "ES", "PS", "NS", "score", "P(new)", "P(true)", "|ΔW|", "seconds"]


def sweep_rows(points: list[dict]) -> list[list]:
    def shown(value, digits=3):
        return None if value is None else round(float(value), digits)

    return [[p["layer"], shown(p["ES"]), shown(p["PS"]), shown(p["NS"]), shown(p["score"], 4), shown(p["new_prob"], 4),
             shown(p["true_prob"], 4), shown(p["delta_norm"]), shown(p["seconds"], 1)] for p in points]


def sweep_summary(mlp_effect: list[float] | None, points: list[dict], done: bool) -> str:
    if mlp_effect is None:
        return "tracing the MLP effect at the last subject token…"
    peak = max(range(len(mlp_effect)), key=mlp_effect.__getitem__)
    line = f"Traced MLP peak: **layer {peak}**."
    scored = [p for p in points if p["score"] is not None]
    if scored:
        best = max(scored, key=lambda p: p["score"])
        line += f" Best edit so far: **layer {best['layer']}** (score {best['score']:.3f}, ES {best['ES']:.0f})."
    return line + ("" if done else f" Editing… {len(points)} layer(s) done.")


@user_errors
def run_sweep(prompt, subject, target_new, target_true, paraphrases, neighborhood, method, layers, samples,
              workspace: Workspace, progress=gr.Progress()):
    """The same edit at each layer, on the model's own weights each time, beside the traced MLP effect."""
    handle = workspace.session.handle
    request = make_request(prompt, subject, target_new, target_true or None)
    check_lengths(handle, (request.filled, request.target_new, request.target_true or ""), "edit prompt and targets")
    probes = Probes(check_lengths(handle, prompt_lines(paraphrases, "paraphrases"), "paraphrases"),
                    check_lengths(handle, prompt_lines(neighborhood, "neighbourhood prompts"), "neighbourhood prompts"))
    chosen = parse_layers(layers, handle.num_layers)
    trace_settings = trace_options(["mlp"], samples, TraceOptions.window, TraceOptions.noise)
    validate_trace_options(trace_settings, config.LIMITS.trace)
    options = edit_options(config.EDIT_OPTIONS, method)
    report = JobReport(workspace, progress)

    def work(emit) -> dict:
        def emit_and_mark(item: dict) -> None:
            emit(item)
            report.shown(FIRST_SHOWN if "mlp_effect" in item else MAIN_SHOWN)

        # An empty session: each layer's edit starts from the model's own weights, not from the user's edits.
        return sweep_layers(EditSession(handle), request, probes, chosen, options, report, emit_and_mark, trace_settings,
                            config.LIMITS.trace)

    effect, points = None, []
    for finished, value in streamed(work, report):
        if finished:
            effect, points = value["mlp_effect"], value["layers"]
        else:
            for item in value:
                if "mlp_effect" in item:
                    effect = item["mlp_effect"]
                else:
                    points.append(item)
        yield (plots.sweep_figure(effect, points, handle.num_layers), sweep_rows(points),
               sweep_summary(effect, points, finished))
