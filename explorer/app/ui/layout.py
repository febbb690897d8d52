"""The page: its components, per tab, and which handler each button calls."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ...core.facts import load_facts
from ...core.models import DEFAULT_MODEL
from ...studies.compare import GENERATION_TOKENS
from ...tracing import KINDS
from .. import plots
from ..model_policy import field_label
from . import config
from .average_handlers import run_average, run_severed
from .config import TRACE_DEFAULTS, TRACE_EXAMPLES
from .edit_handlers import (
    COMPARISON_HEADERS,
    complete_prompts,
    fill_from_case,
    reset_edits,
    run_edit,
    sample_case_labels,
    toggle_edit,
    undo_edit,
)
from .inputs import METHOD_CHOICES
from .jobs import cancel_job
from .lazy_panels import keep_typed_values
from .sessions import EDIT_LIST_HEADERS, Workspace, load_session_model, preparation_status, status_line
from .sweep_handlers import SWEEP_HEADERS, run_sweep
from .trace_handlers import compare_traces, inspect_trace_cell, run_trace


def trace_examples() -> list[list[str]]:
    """Clickable (prompt, subject) pairs from the bundled fact set, spread over its relations."""
    facts = load_facts()
    step = max(1, len(facts) // TRACE_EXAMPLES)
    return [[fact.prompt, fact.subject] for fact in facts[::step][:TRACE_EXAMPLES]]


def _heatmap_row(label: str, elem_id: str) -> list:
    with gr.Row(elem_id=elem_id):
        return [gr.Plot(label=f"{label}{kind}", visible=False, elem_id=f"{elem_id}-{kind}") for kind in KINDS]


# A click on a cell of an exact heatmap writes "kind,token,layer" into the cell field and presses Inspect.
# Plotly draws a new plot element when a figure is replaced, so new ones are looked for every second.
CLICK_TO_INSPECT_JS = """
() => {
  const bind = () => {
    for (const kind of ["hidden", "mlp", "attn"]) {
      const plot = document.querySelector(`#trace-plots-${kind} .js-plotly-plot`);
      if (!plot || plot.__inspectBound || typeof plot.on !== "function") continue;
      plot.__inspectBound = true;
      plot.on("plotly_click", (event) => {
        const point = event.points[0];
        const field = document.querySelector("#inspect-cell textarea, #inspect-cell input");
        field.value = `${kind},${point.y},${point.x}`;
        field.dispatchEvent(new Event("input", {bubbles: true}));
        setTimeout(() => document.querySelector("#inspect-button").click(), 100);
      });
    }
  };
  setInterval(bind, 1000);
}
"""


@dataclass
class TraceTab:
    prompt: gr.Textbox
    subject: gr.Textbox
    target: gr.Textbox
    kinds: gr.CheckboxGroup
    samples: gr.Slider
    window: gr.Slider
    noise: gr.Slider
    button: gr.Button
    cancel: gr.Button
    caption: gr.Textbox
    plots: list
    cell: gr.Textbox
    inspect_button: gr.Button
    inspection: gr.Markdown
    estimate_note: gr.Markdown
    estimate_plots: list
    downloads: gr.File
    layer: gr.Textbox
    to_edit: gr.Button


@dataclass
class EditTab:
    case: gr.Dropdown
    prompt: gr.Textbox
    subject: gr.Textbox
    target_new: gr.Textbox
    target_true: gr.Textbox
    layer: gr.Textbox
    method: gr.Dropdown
    paraphrases: gr.Textbox
    neighborhood: gr.Textbox
    generate: gr.Textbox
    button: gr.Button
    cancel: gr.Button
    generations: gr.HTML
    bars: gr.Plot
    table: gr.Dataframe
    metrics: gr.Markdown
    edits: gr.Dataframe
    undo_number: gr.Textbox
    undo_button: gr.Button
    reset_button: gr.Button
    compare_kinds: gr.CheckboxGroup
    compare_button: gr.Button
    compare_caption: gr.Textbox
    original_plots: list
    edited_plots: list
    free_prompts: gr.Textbox
    new_tokens: gr.Number
    complete_button: gr.Button
    completions: gr.HTML
    toggle_button: gr.Button
    health: gr.Markdown
    sweep: SweepPanel


@dataclass
class SweepPanel:
    layers: gr.Textbox
    samples: gr.Slider
    button: gr.Button
    cancel: gr.Button
    summary: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe


@dataclass
class AverageTab:
    upload: gr.File
    limit: gr.Slider
    kinds: gr.CheckboxGroup
    samples: gr.Slider
    average_button: gr.Button
    severed_button: gr.Button
    cancel: gr.Button
    summary: gr.Markdown
    plot: gr.Plot
    file: gr.File


def trace_tab(examples: list[list[str]]) -> TraceTab:
    """The Trace tab's components: inputs, the exact maps, a look inside a cell, the estimate, downloads."""
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value=examples[0][0], elem_id="trace-prompt")
        subject = gr.Textbox(label="Subject (guessed when empty)", value=examples[0][1], elem_id="trace-subject")
        target = gr.Textbox(label="Target (empty: the model's own answer)", value="")
    with gr.Row():
        kinds = gr.CheckboxGroup(list(KINDS), value=list(KINDS), label="Kinds")
        samples = gr.Slider(1, config.LIMITS.max_samples, value=TRACE_DEFAULTS.samples, step=1, label="Samples", elem_id="trace-samples")
        window = gr.Slider(1, min(30, config.LIMITS.max_window), value=TRACE_DEFAULTS.window, step=1, label="Window")
        noise = gr.Slider(0.5, 10, value=TRACE_DEFAULTS.noise, step=0.5, label="Noise (x sigma)")
    with gr.Row():
        button = gr.Button("Trace", variant="primary", elem_id="trace-button")
        cancel = gr.Button("Cancel", variant="stop", elem_id="trace-cancel")
    caption = gr.Textbox(label="Result", interactive=False, elem_id="trace-caption")
    plots_out = _heatmap_row("", "trace-plots")
    with gr.Accordion("Look inside a cell: click a cell of a heatmap above", open=True):
        with gr.Row():
            cell = gr.Textbox(label="Cell: kind,token,layer (filled by a click on a heatmap)", elem_id="inspect-cell", scale=4)
            inspect_button = gr.Button("Inspect", elem_id="inspect-button", scale=1)
        inspection = gr.Markdown(elem_id="inspect-result")
    estimate_note = gr.Markdown(elem_id="trace-estimate-note")
    estimate_out = _heatmap_row("estimate ", "trace-estimate-plots")
    with gr.Row():
        downloads = gr.File(label="Downloads (JSON, CSV, ROME npz)", file_count="multiple", interactive=False)
        with gr.Column():
            layer = gr.Textbox(label="Layer to edit: this trace's peak MLP effect at the last subject token "
                                     "(an empty layer in the Edit tab uses the model's default, chosen by evaluation)")
            to_edit = gr.Button("Edit at this layer")
    gr.Examples(examples, [prompt, subject], label="Facts from the bundled set")
    return TraceTab(prompt, subject, target, kinds, samples, window, noise, button, cancel, caption, plots_out, cell,
                    inspect_button, inspection, estimate_note, estimate_out, downloads, layer, to_edit)


def edit_tab() -> EditTab:
    """The Edit tab's components: the request, before vs after, the active edits, traces and completions to compare."""
    case = gr.Dropdown(sample_case_labels(), label="Example (hand-written in CounterFact's format)", value=None)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt ({} for the subject, or the subject written out)", value="{} is located in the city of", elem_id="edit-prompt")
        subject = gr.Textbox(label="Subject", value="The Eiffel Tower", elem_id="edit-subject")
        target_new = gr.Textbox(label="New target", value=" Rome", elem_id="edit-target-new")
        target_true = gr.Textbox(label="True target (empty: the model's answer)", value="")
    with gr.Row():
        # A text field: Gradio's Number shows an empty value as 0, which is a real layer.
        layer = gr.Textbox(label="Layer (empty: the model's default)", value="", elem_id="edit-layer")
        method = gr.Dropdown(list(METHOD_CHOICES), value="rome", label="Method",
                             info="reference settings: rome-original with every choice the ROME reference code makes")
    with gr.Row():
        paraphrases = gr.Textbox(label="Paraphrases (one per line)", lines=3)
        neighborhood = gr.Textbox(label="Neighbourhood prompts (one per line)", lines=3, value="The Louvre is located in the city of")
        generate = gr.Textbox(label="Prompts to complete (one per line)", lines=3, value="The Eiffel Tower is located in")
    with gr.Row():
        button = gr.Button("Edit", variant="primary", elem_id="edit-button")
        cancel = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
    generations = gr.HTML(label="Completions: original | edited", elem_id="edit-generations")
    bars = gr.Plot(label="P(new) and P(true) before vs after", elem_id="edit-bars")
    table = gr.Dataframe(headers=COMPARISON_HEADERS, label="Before vs after", interactive=False)
    metrics = gr.Markdown(label="metrics", elem_id="edit-metrics")
    health = gr.Markdown(elem_id="edit-health")
    edits = gr.Dataframe(headers=EDIT_LIST_HEADERS, label="Your edits (switched off: kept, not applied)", interactive=False,
                         elem_id="edit-list")
    with gr.Row():
        undo_number = gr.Textbox(label="Edit # to undo or switch (empty: last)", value="", elem_id="undo-number")
        undo_button = gr.Button("Undo", elem_id="undo-button")
        toggle_button = gr.Button("Switch off / on", elem_id="toggle-button")
        reset_button = gr.Button("Reset all", elem_id="reset-button")
    sweep = sweep_panel()
    with gr.Accordion("Trace again: original vs edited", open=False):
        compare_kinds = gr.CheckboxGroup(list(KINDS), value=["mlp"], label="Kinds")
        compare_button = gr.Button("Trace original and edited")
        compare_caption = gr.Textbox(label="Result", interactive=False, lines=2)
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Original model**")
                original_plots = [gr.Plot(label=f"original {kind}", visible=False) for kind in KINDS]
            with gr.Column():
                gr.Markdown("**Edited model**")
                edited_plots = [gr.Plot(label=f"edited {kind}", visible=False) for kind in KINDS]
    with gr.Accordion("Try your edited model", open=False):
        with gr.Row():
            free_prompts = gr.Textbox(label="Prompts (one per line)", lines=3, value="The Eiffel Tower is located in", scale=4)
            new_tokens = gr.Number(label=f"new tokens (at most {config.LIMITS.max_new_tokens})", precision=0, scale=1,
                                   value=min(GENERATION_TOKENS, config.LIMITS.max_new_tokens))
        complete_button = gr.Button("Complete")
        completions = gr.HTML(label="completions")
    return EditTab(case, prompt, subject, target_new, target_true, layer, method, paraphrases, neighborhood, generate, button,
                   cancel, generations, bars, table, metrics, edits, undo_number, undo_button, reset_button, compare_kinds,
                   compare_button, compare_caption, original_plots, edited_plots, free_prompts, new_tokens, complete_button, completions,
                   toggle_button, health, sweep)


def sweep_panel() -> SweepPanel:
    """The layer sweep: the request above edited at each layer, beside the trace's MLP effect (Hase et al. 2023)."""
    with gr.Accordion("Layer sweep: does the traced layer edit best?", open=False):
        gr.Markdown("The request above, edited at each layer on the model's own weights (not on your edits) and scored "
                    "on its paraphrases and neighbours, beside the traced MLP effect at the last subject token. Each "
                    "layer's point appears as soon as it is computed.")
        with gr.Row():
            layers = gr.Textbox(label="Layers (e.g. 0-17 or 2,4,6; empty: all)", value="", elem_id="sweep-layers")
            samples = gr.Slider(1, config.LIMITS.max_samples, value=TRACE_DEFAULTS.samples, step=1, label="Trace samples")
            button = gr.Button("Sweep layers", variant="primary", elem_id="sweep-button")
            cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel")
        summary = gr.Markdown(elem_id="sweep-summary")
        plot = gr.Plot(label="MLP effect vs edit score per layer", elem_id="sweep-plot")
        table = gr.Dataframe(headers=SWEEP_HEADERS, label="Per layer", interactive=False, elem_id="sweep-table")
    return SweepPanel(layers, samples, button, cancel, summary, plot, table)


def average_tab() -> AverageTab:
    """The Average tab's components: a fact set, its settings, and the averaged result."""
    gr.Markdown("The paper's Figure 2 and its severed-path analysis over a fact set. On the embedded model on 2 CPU "
                "cores one fact takes about 40 s per kind with 10 samples.")
    with gr.Row():
        upload = gr.File(label="Fact set (known_1000.json format; empty: the bundled set)", file_types=[".json"], type="filepath")
        with gr.Column():
            limit = gr.Slider(1, config.LIMITS.max_facts, value=5, step=1, label="Facts")
            kinds = gr.CheckboxGroup(list(KINDS), value=["mlp"], label="Kinds")
            samples = gr.Slider(1, config.LIMITS.max_samples, value=TRACE_DEFAULTS.samples, step=1, label="Samples", elem_id="average-samples")
    with gr.Row():
        average_button = gr.Button("Average effects", variant="primary")
        severed_button = gr.Button("Severed paths")
        cancel = gr.Button("Cancel", variant="stop", elem_id="average-cancel")
    summary = gr.Markdown(label="summary")
    plot = gr.Plot(label="Average effects")
    file = gr.File(label="Download (JSON)", interactive=False)
    return AverageTab(upload, limit, kinds, samples, average_button, severed_button, cancel, summary, plot, file)


def job_queue() -> dict:
    """Gradio's settings for an event that runs on the model: every such event of every visitor shares one group of
    at most ``max_running`` jobs, which take turns step by step (explorer/app/scheduler.py); more wait in line."""
    return {"concurrency_id": "model-jobs", "concurrency_limit": config.LIMITS.max_running}


def wire_trace(demo: gr.Blocks, t: TraceTab, workspace: gr.State) -> list:
    """The Trace tab's events; the jobs a Cancel button may stop."""
    trace_event = t.button.click(
        run_trace, [t.prompt, t.subject, t.kinds, t.samples, t.window, t.noise, workspace, t.target],
        [*t.plots, t.caption, t.subject, t.downloads, t.layer, workspace, *t.estimate_plots, t.estimate_note], api_name="trace", **job_queue(),
    )
    inspect_event = t.inspect_button.click(
        inspect_trace_cell, [t.prompt, t.subject, t.kinds, t.samples, t.window, t.noise, t.cell, workspace, t.target],
        [t.inspection], api_name="inspect", **job_queue(),
    )
    demo.load(None, None, None, js=CLICK_TO_INSPECT_JS)
    return [trace_event, inspect_event]


def wire_edit(e: EditTab, t: TraceTab, workspace: gr.State) -> list:
    """The Edit tab's events (its compare traces use the Trace tab's samples, window and noise); its cancellable jobs."""
    e.case.change(fill_from_case, [e.case], [e.prompt, e.subject, e.target_new, e.target_true, e.paraphrases, e.neighborhood,
                                              e.generate], api_name=False)
    edit_event = e.button.click(
        run_edit,
        [e.prompt, e.subject, e.target_new, e.target_true, e.layer, e.method, e.paraphrases, e.neighborhood, e.generate, workspace],
        [e.table, e.bars, e.generations, e.metrics, e.edits, workspace, e.health], api_name="edit", **job_queue(),
    )
    e.undo_button.click(undo_edit, [e.undo_number, workspace], [e.edits, workspace], api_name="undo")
    e.toggle_button.click(toggle_edit, [e.undo_number, workspace], [e.edits, e.health, workspace], api_name="toggle", **job_queue())
    sweep_event = e.sweep.button.click(
        run_sweep, [e.prompt, e.subject, e.target_new, e.target_true, e.paraphrases, e.neighborhood, e.method, e.sweep.layers,
                    e.sweep.samples, workspace], [e.sweep.plot, e.sweep.table, e.sweep.summary], api_name="sweep",
        **job_queue(),
    )
    e.reset_button.click(reset_edits, [workspace], [e.edits, workspace], api_name="reset")
    compare_event = e.compare_button.click(
        compare_traces, [e.prompt, e.subject, e.target_new, e.compare_kinds, t.samples, t.window, t.noise, workspace],
        [*e.original_plots, *e.edited_plots, e.compare_caption], api_name="compare", **job_queue(),
    )
    e.complete_button.click(complete_prompts, [e.free_prompts, e.new_tokens, workspace], [e.completions], api_name="complete",
                            **job_queue())
    return [edit_event, compare_event, sweep_event]


def wire_average(a: AverageTab, workspace: gr.State) -> list:
    """The Average tab's events; its cancellable jobs."""
    outputs = [a.plot, a.summary, a.file]
    average_event = a.average_button.click(run_average, [a.upload, a.limit, a.kinds, a.samples, workspace], outputs,
                                           api_name="average", **job_queue())
    severed_event = a.severed_button.click(run_severed, [a.upload, a.limit, a.samples, workspace], outputs, api_name="severed",
                                           **job_queue())
    return [average_event, severed_event]


def build_app(model_name: str = DEFAULT_MODEL) -> gr.Blocks:
    """The page: model, trace, edit and average panels over one shared model, edits kept per browser session."""
    with gr.Blocks(title="ROME Explorer") as demo:
        workspace = gr.State(Workspace(model_name), delete_callback=Workspace.close)
        gr.Markdown("# ROME Explorer\nLocate factual associations with causal tracing and rewrite them with ROME (Meng et al.).")
        # Outside the accordion: the start-up preparation's progress is visible without opening anything.
        model_status = gr.Markdown(f"Model: **{plots.safe_label(model_name)}** (loaded on first use)", elem_id="model-status")
        status_poll = gr.Timer(1.0)
        with gr.Accordion("Model", open=False):
            with gr.Row():
                model_field = gr.Textbox(label=field_label(), value=model_name, scale=4)
                load_button = gr.Button("Load", scale=1)
        with gr.Tabs() as tabs:
            with gr.Tab("Trace", id="trace", elem_id="trace-panel"):
                trace = trace_tab(trace_examples())
            with gr.Tab("Edit", id="edit", elem_id="edit-panel"):
                edit = edit_tab()
            with gr.Tab("Average effects", id="average", elem_id="average-panel"):
                average = average_tab()

        load_button.click(load_session_model, [model_field, workspace], [model_status, edit.edits, workspace, status_poll],
                          api_name="load_model")
        # Not queued behind a running job: the status line moves while a trace or an edit runs.
        status_poll.tick(status_line, [workspace], [model_status, status_poll], concurrency_limit=None, show_progress="hidden",
                         api_name=False)
        trace.to_edit.click(lambda value: (value, gr.Tabs(selected="edit")), [trace.layer], [edit.layer, tabs], api_name=False)
        jobs = [*wire_trace(demo, trace, workspace), *wire_edit(edit, trace, workspace), *wire_average(average, workspace)]

        def model_status_api(model: str = "") -> dict:
            """Where the background preparation of ``model`` (empty: the app's own) stands: loaded, running, message."""
            return preparation_status(str(model or "").strip() or model_name)

        gr.api(model_status_api, api_name="model_status", concurrency_limit=None)
        cancels = ((trace.cancel, trace.caption), (edit.cancel, edit.metrics), (edit.sweep.cancel, edit.sweep.summary),
                   (average.cancel, average.summary))
        for stop, note in cancels:
            # Its own concurrency group, so a cancel is never queued behind the job it cancels. The page stops
            # listening to the cancelled job, so the cancel itself says so where that job's result would appear.
            stop.click(cancel_job, [workspace], [note], cancels=jobs, concurrency_limit=None, api_name=False)
        keep_typed_values(demo)
    return demo
