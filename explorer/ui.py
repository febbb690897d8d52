"""The Gradio app: layout and event wiring only; the engines do the work."""
from __future__ import annotations

import functools
import threading
from dataclasses import replace

import gradio as gr

from . import plots
from .compare import Probes, compare, with_true_target
from .editing import METHODS, EditOptions, compute_edit, make_request, validate_options
from .edits import EditSession
from .evaluate import read_dataset
from .facts import ASSETS
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from .prompts import InputError
from .tracing import KINDS, TraceOptions, trace

SAMPLE_CASES = ASSETS / "counterfact_sample.json"
EDIT_ERRORS = (InputError, ModelLoadError, FloatingPointError)
EDIT_OPTIONS = EditOptions()  # the app's edit settings (the paper's); method and layer come from the page

EXAMPLES = [
    ["The Eiffel Tower is located in the city of", "The Eiffel Tower"],
    ["The mother tongue of Vladimir Putin is", "Vladimir Putin"],
    ["Michael Jordan plays the sport of", "Michael Jordan"],
]

_model_lock = threading.Lock()
_models: dict[str, LoadedModel] = {}


def shared_model(name: str = DEFAULT_MODEL) -> LoadedModel:
    """The one loaded copy of ``name`` that every session shares."""
    with _model_lock:
        if name not in _models:
            _models[name] = load_model(name)
        return _models[name]


def session_for(state: EditSession | None) -> EditSession:
    """This browser session's edits over the shared model (created on first use)."""
    return state if state is not None else EditSession(shared_model())


def run_trace(
    prompt: str, subject: str, kinds: list[str], samples: float, window: float, noise: float,
    state: EditSession | None = None, progress=gr.Progress(),
):
    """Trace handler, on this session's edited model: heatmaps for the chosen kinds, a caption, the subject used."""
    try:
        options = TraceOptions(kinds=tuple(kinds), samples=int(samples), window=int(window), noise=float(noise))
        session = session_for(state)
        with session.applied():
            result = trace(session.handle, prompt, subject or None, options, progress=lambda f, m: progress(f, desc=m))
    except EDIT_ERRORS as error:
        raise gr.Error(str(error)) from None
    figures = [plots.heatmap(result, kind) if kind in result.scores else None for kind in KINDS]
    caption = plots.caption(result) + (f" (on the model with {len(session.edits)} edit(s) of yours)" if session.edits else "")
    return (*[gr.update(value=f, visible=f is not None) for f in figures], caption, result.subject, session)


def optional_int(value: object, what: str) -> int | None:
    """A whole number typed into a text field, None when left empty."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise InputError(f"{what} must be a whole number or empty, got {text!r}")
    return int(number)


def _lines(text: str | None) -> tuple[str, ...]:
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


def run_edit(
    prompt: str, subject: str, target_new: str, target_true: str, layer: str | None, method: str,
    paraphrases: str, neighborhood: str, generate: str, state: EditSession | None = None, progress=gr.Progress(),
):
    """Edit handler: compute the edit, add it to this session, and show before vs after."""
    try:
        session = session_for(state)
        handle = session.handle
        request = make_request(prompt, subject, target_new, target_true or None)
        options = replace(EDIT_OPTIONS, method=method, layer=optional_int(layer, "layer"))
        validate_options(handle, options)
        request = with_true_target(handle, request, session)
        with session.applied():
            edit = compute_edit(handle, request, options, progress=lambda f, m: progress(f, desc=m))
        probes = Probes(_lines(paraphrases), _lines(neighborhood), _lines(generate) or (request.filled,))
        report = compare(session, edit, probes)
        session.add(edit)
    except EDIT_ERRORS as error:
        raise gr.Error(str(error)) from None
    return (
        comparison_rows(request, probes, report),
        plots.generations_html(report, request.target_new, request.target_true),
        plots.metrics_markdown(report["metrics"], report["warnings"]),
        active_rows(session),
        session,
    )


def comparison_rows(request, probes: Probes, report: dict) -> list[list]:
    """One row per prompt: its role, P(new) and P(true) before and after."""
    before, after = report["before"], report["after"]
    rows = [["edit", request.filled, before["target_new_prob"], after["target_new_prob"],
             before["target_true_prob"], after["target_true_prob"]]]
    for role, key, prompts in (("paraphrase", "paraphrases", probes.paraphrases), ("neighbour", "neighborhood", probes.neighborhood)):
        for i, text in enumerate(prompts):
            rows.append([role, text, before[key]["target_new_prob"][i], after[key]["target_new_prob"][i],
                         before[key]["target_true_prob"][i], after[key]["target_true_prob"][i]])
    return [[*row[:2], *(float(v) for v in row[2:])] for row in rows]


COMPARISON_HEADERS = ["role", "prompt", "P(new) before", "P(new) after", "P(true) before", "P(true) after"]
EDIT_LIST_HEADERS = ["#", "subject", "prompt", "target_new", "layer", "method", "|ΔW|"]


def active_rows(session: EditSession) -> list[list]:
    """The session's active edits, oldest first."""
    return [[i + 1, e["request"]["subject"], e["request"]["prompt"], e["request"]["target_new"], e["layer"], e["method"],
             round(e["delta_norm"], 3)] for i, e in enumerate(session.active())]


def undo_edit(number: str | None, state: EditSession | None = None):
    """Undo one edit (by its number in the list; the last when empty)."""
    session = session_for(state)
    try:
        chosen = optional_int(number, "edit number")
        session.undo(-1 if chosen is None else chosen - 1)
    except InputError as error:
        raise gr.Error(str(error)) from None
    return active_rows(session), session


def reset_edits(state: EditSession | None = None):
    """Remove every edit of this session."""
    session = session_for(state)
    session.clear()
    return active_rows(session), session


@functools.lru_cache(maxsize=1)
def sample_cases() -> tuple:
    """The bundled CounterFact cases, read once per process."""
    return tuple(read_dataset(SAMPLE_CASES)[1])


def sample_case_labels() -> list[str]:
    """Labels of the bundled CounterFact cases offered as examples."""
    return [f"{c.case_id}: {c.request.filled} → {c.request.target_new.strip()}" for c in sample_cases()]


def fill_from_case(label: str):
    """The edit panel's fields from a bundled CounterFact case."""
    case = {c.case_id: c for c in sample_cases()}[label.split(":", 1)[0]]
    r = case.request
    return r.prompt, r.subject, r.target_new, r.target_true, "\n".join(case.paraphrases), "\n".join(case.neighborhood), "\n".join(case.generation)


def build_app() -> gr.Blocks:
    """The page: a trace panel and an edit panel over one shared model, edits kept per browser session."""
    with gr.Blocks(title="ROME Explorer") as demo:
        state = gr.State(None)
        gr.Markdown("# ROME Explorer\nLocate factual associations with causal tracing and rewrite them with ROME (Meng et al.).")
        with gr.Tab("Trace"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0][0])
                subject = gr.Textbox(label="Subject (guessed when empty)", value=EXAMPLES[0][1])
            with gr.Row():
                kinds = gr.CheckboxGroup(list(KINDS), value=list(KINDS), label="Kinds")
                samples = gr.Slider(1, 50, value=10, step=1, label="Samples")
                window = gr.Slider(1, 30, value=10, step=1, label="Window")
                noise = gr.Slider(0.5, 10, value=3, step=0.5, label="Noise (x sigma)")
            button = gr.Button("Trace", variant="primary")
            caption = gr.Textbox(label="Result", interactive=False)
            plots_out = [gr.Plot(label=kind) for kind in KINDS]
            gr.Examples(EXAMPLES, [prompt, subject])
            button.click(
                run_trace, [prompt, subject, kinds, samples, window, noise, state], [*plots_out, caption, subject, state],
                api_name="trace",
            )
        with gr.Tab("Edit"):
            case = gr.Dropdown(sample_case_labels(), label="Example from the bundled CounterFact sample", value=None)
            with gr.Row():
                edit_prompt = gr.Textbox(label="Prompt ({} for the subject, or the subject written out)", value="{} is located in the city of")
                edit_subject = gr.Textbox(label="Subject", value="The Eiffel Tower")
                target_new = gr.Textbox(label="New target", value=" Rome")
                target_true = gr.Textbox(label="True target (empty: the model's answer)", value="")
            with gr.Row():
                # A text field: Gradio's Number shows an empty value as 0, which is a real layer.
                layer = gr.Textbox(label="Layer (empty: the model's default)", value="")
                method = gr.Dropdown(list(METHODS), value="rome", label="Method")
            with gr.Row():
                paraphrases = gr.Textbox(label="Paraphrases (one per line)", lines=3)
                neighborhood = gr.Textbox(label="Neighbourhood prompts (one per line)", lines=3, value="The Louvre is located in the city of")
                generate = gr.Textbox(label="Prompts to complete (one per line)", lines=3, value="The Eiffel Tower is located in")
            edit_button = gr.Button("Edit", variant="primary")
            table = gr.Dataframe(headers=COMPARISON_HEADERS, label="Before vs after", interactive=False)
            generations = gr.HTML(label="Completions: original | edited")
            metrics = gr.Markdown()
            edits = gr.Dataframe(headers=EDIT_LIST_HEADERS, label="Your active edits", interactive=False)
            with gr.Row():
                undo_number = gr.Textbox(label="Edit # to undo (empty: last)", value="")
                undo_button = gr.Button("Undo")
                reset_button = gr.Button("Reset all")
            case.change(fill_from_case, [case], [edit_prompt, edit_subject, target_new, target_true, paraphrases, neighborhood, generate])
            edit_button.click(
                run_edit,
                [edit_prompt, edit_subject, target_new, target_true, layer, method, paraphrases, neighborhood, generate, state],
                [table, generations, metrics, edits, state],
                api_name="edit",
            )
            undo_button.click(undo_edit, [undo_number, state], [edits, state], api_name="undo")
            reset_button.click(reset_edits, [state], [edits, state], api_name="reset")
    return demo
