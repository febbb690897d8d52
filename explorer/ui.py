"""The Gradio app: layout and event wiring only; the engines do the work."""
from __future__ import annotations

import threading

import gradio as gr

from . import plots
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from .prompts import InputError
from .tracing import KINDS, TraceOptions, trace

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


def run_trace(prompt: str, subject: str, kinds: list[str], samples: float, window: float, noise: float, progress=gr.Progress()):
    """Trace handler: heatmaps for the chosen kinds, a caption and the subject used."""
    try:
        options = TraceOptions(kinds=tuple(kinds), samples=int(samples), window=int(window), noise=float(noise))
        handle = shared_model()
        result = trace(handle, prompt, subject or None, options, progress=lambda f, m: progress(f, desc=m))
    except (InputError, ModelLoadError) as error:
        raise gr.Error(str(error)) from None
    figures = [plots.heatmap(result, kind) if kind in result.scores else None for kind in KINDS]
    return (*[gr.update(value=f, visible=f is not None) for f in figures], plots.caption(result), result.subject)


def build_app() -> gr.Blocks:
    """The page: a trace panel (editing and averages join it as their engines land)."""
    with gr.Blocks(title="ROME Explorer") as demo:
        gr.Markdown("# ROME Explorer\nLocate factual associations with causal tracing (Meng et al., ROME).")
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
            run_trace, [prompt, subject, kinds, samples, window, noise], [*plots_out, caption, subject], api_name="trace"
        )
    return demo
