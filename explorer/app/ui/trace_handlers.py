"""The Trace tab's handlers: the streamed trace with its estimate, a look inside one cell, and original vs edited traces."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import numpy as np

from ...core.errors import InputError
from ...core.models import model_fingerprint
from ...core.progress import part_of
from ...editing import make_request
from ...editing.edits import EditSession
from ...tracing import KINDS, TraceOptions, TraceResult, export, trace
from ...tracing.attribution import agreement, estimate_trace
from ...tracing.inspection import inspect_cell, parse_cell
from .. import plots
from ..scheduler import FIRST_SHOWN, MAIN_SHOWN
from . import config
from .errors import user_errors
from .inputs import trace_options
from .jobs import JobReport, in_worker, streamed
from .sessions import Workspace


def heatmaps(result: TraceResult) -> tuple:
    """A plotly figure per kind of KINDS, None where the result has no such kind."""
    return tuple(plots.heatmap(result, kind) if kind in result.scores else None for kind in KINDS)


def _figures(result: TraceResult) -> list:
    return _shown(heatmaps(result))


def _shown(figures) -> list:
    """One fresh update per heatmap slot (Gradio consumes an update's value, so a cached one cannot be reused)."""
    return [gr.update(value=figure, visible=True) if figure is not None else gr.update(value=None, visible=False)
            for figure in figures]


def peak_mlp_layer(result: TraceResult) -> int | None:
    """The layer of the strongest MLP effect at the last subject token: where the paper edits."""
    if "mlp" not in result.scores:
        return None
    return int(np.argmax(np.asarray(result.scores["mlp"])[result.subject_range[1] - 1]))


def write_downloads(result: TraceResult, folder: Path) -> list[str]:
    """The trace as JSON, CSV and ROME's npz (one file per kind), for the download box."""
    paths = [export.write_json(result, folder / "trace.json")]
    (folder / "trace.csv").write_text(export.trace_to_csv(result), encoding="utf-8")
    paths += [folder / "trace.csv", *export.write_npz(result, folder / "trace.npz")]
    return [str(path) for path in paths]


def trace_key(session: EditSession, prompt: str, subject: str | None, options: TraceOptions) -> tuple:
    """What a trace's result depends on: the model, the session's edits, the prompt, subject and options."""
    return (model_fingerprint(session.handle), tuple(edit.digest for edit in session.applied_edits()), prompt, subject or None,
            options, config.LIMITS.trace)


@dataclass(frozen=True)
class FinishedTrace:
    """A finished trace as the page shows it, figures built once: kept in config.TRACE_CACHE for repeats."""

    estimate: TraceResult
    exact: TraceResult
    exact_figures: tuple  # a plotly figure per kind of KINDS, None where not traced
    estimate_figures: tuple
    agreement: str

    @classmethod
    def of(cls, estimate: TraceResult, exact: TraceResult) -> FinishedTrace:
        report = plots.agreement_markdown(agreement(exact, estimate), estimate.seconds, exact.seconds)
        return cls(estimate, exact, heatmaps(exact), heatmaps(estimate), report)


def _finished(finished: FinishedTrace, session: EditSession, workspace: Workspace) -> tuple:
    exact = finished.exact
    applied = len(session.applied_edits())
    caption = plots.caption(exact) + (f" (on the model with {applied} edit(s) of yours)" if applied else "")
    layer = peak_mlp_layer(exact)
    return (*_shown(finished.exact_figures), caption, exact.subject, write_downloads(exact, workspace.files("trace")),
            gr.update() if layer is None else str(layer), workspace, *_shown(finished.estimate_figures), finished.agreement)


@user_errors
def run_trace(prompt, subject, kinds, samples, window, noise, workspace: Workspace, target=None, progress=gr.Progress()):
    """Trace handler, on this session's edited model: heatmaps, caption, the subject used, downloads, a layer to
    edit, then the attribution-patching estimate's heatmaps and how far they were from the exact trace.

    Streams: the estimate is drawn first (seconds), then the exact heatmaps appear with their first cells
    and fill in. A trace identical to one already computed (same model, edits, prompt, subject and
    options) comes from a cache at once.
    """
    options = trace_options(kinds, samples, window, noise, target)
    session = workspace.session
    key = trace_key(session, str(prompt), subject, options)
    cached = config.TRACE_CACHE.get(key)
    if cached is not None:
        yield _finished(cached, session, workspace)
        return
    report = JobReport(workspace, progress)

    def work(emit) -> FinishedTrace:
        def show(stage: int):
            def emit_and_mark(result: TraceResult) -> None:
                emit(result)
                report.shown(stage)
            return emit_and_mark

        with session.applied():
            estimate = estimate_trace(session.handle, prompt, subject or None, options, config.LIMITS.trace,
                                      progress=part_of(report, 0, 0.02), partial=show(FIRST_SHOWN))
            show(FIRST_SHOWN)(estimate)
            exact = trace(session.handle, prompt, subject or None, options, config.LIMITS.trace, progress=report,
                          partial=show(MAIN_SHOWN))
        finished = FinishedTrace.of(estimate, exact)
        config.TRACE_CACHE.put(key, finished)  # here, not in the page's loop: kept even if the page went away
        return finished

    for finished, results in streamed(work, report):
        if finished:
            yield _finished(results, session, workspace)
            continue
        estimates = [result for result in results if result.method == "atp"]
        exact = [result for result in results if result.method != "atp"]
        if exact:
            exact_part = (*_figures(exact[-1]), plots.caption(exact[-1]), gr.update(), gr.update(), gr.update(), workspace)
        else:  # the estimate comes first: the last trace's exact maps are cleared meanwhile
            exact_part = (*(gr.update(value=None, visible=False) for _ in KINDS),
                          plots.caption(estimates[-1]) + " — estimate drawn below; computing the exact trace",
                          gr.update(), gr.update(), gr.update(), workspace)
        if estimates:
            note = ("**Estimate** (attribution patching), each map on its own relative scale; the exact trace is being "
                    "computed above.")
            estimate_part = (*_figures(estimates[-1]), note)
        else:
            estimate_part = (*(gr.update() for _ in KINDS), gr.update())
        yield (*exact_part, *estimate_part)


@user_errors
def inspect_trace_cell(prompt, subject, kinds, samples, window, noise, cell, workspace: Workspace, target=None):
    """A look inside one cell (``kind,token,layer``, filled by clicking a heatmap) on this session's model."""
    options = trace_options(kinds, samples, window, noise, target)
    kind, token, layer = parse_cell(cell)
    session = workspace.session
    with JobReport(workspace, None).turns(), session.applied():
        found = inspect_cell(session.handle, prompt, subject or None, kind, token, layer, options, config.LIMITS.trace)
    return plots.inspection_markdown(found)


@user_errors
def compare_traces(prompt, subject, target_new, kinds, samples, window, noise, workspace: Workspace, progress=gr.Progress()):
    """The edit prompt traced on the original and on this session's edited model, with the same noise."""
    session = workspace.session
    if not session.applied_edits():
        raise InputError("no active edits: make an edit first, then trace again to compare")
    options = trace_options(kinds, samples, window, noise)
    # Only the filled prompt is used: a placeholder stands in for an empty target field.
    request = make_request(prompt, subject, target_new or " x")
    report = JobReport(workspace, progress)

    def work() -> tuple[TraceResult, TraceResult]:
        # The answer is fixed to the original model's, so both maps show the probability of the same token.
        original = trace(session.handle, request.filled, request.subject, options, config.LIMITS.trace,
                         progress=part_of(report, 0, 0.5, "original model: "))
        with session.applied():
            edited = trace(session.handle, request.filled, request.subject, replace(options, target=original.answer),
                           config.LIMITS.trace, progress=part_of(report, 0.5, 1, "edited model: "))
        return original, edited

    original, edited = in_worker(work, report)
    caption = f"original: {plots.caption(original)}\nedited: {plots.caption(edited)}"
    return (*_figures(original), *_figures(edited), caption)
