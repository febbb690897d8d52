"""Serving the page: its queue, Gradio's own caps, and the start-up preparation of the model."""
from __future__ import annotations

import os

import gradio as gr

from ...core.models import DEFAULT_MODEL
from . import config
from .layout import build_app
from .sessions import start_preparation


def queued_app(model_name: str = DEFAULT_MODEL) -> gr.Blocks:
    """The page with its queue: the model's jobs take turns in their own group (job_queue); past ``queue_size``
    waiting requests Gradio answers "queue is full"."""
    demo = build_app(model_name)
    demo.queue(default_concurrency_limit=1, max_size=config.LIMITS.queue_size)
    return demo


def launch_settings() -> dict:
    """``launch``'s caps: Gradio itself refuses a larger upload before storing it (the handler checks again)."""
    return {"max_file_size": config.LIMITS.max_upload_bytes}


def launch(model_name: str | None = None) -> None:
    """Start the app: ``ROME_EXPLORER_MODEL`` (or ``model_name``) on 127.0.0.1 unless GRADIO_SERVER_NAME says otherwise."""
    model_name = model_name or os.environ.get("ROME_EXPLORER_MODEL", DEFAULT_MODEL)
    demo = queued_app(model_name)
    # Load the model and prepare its first edit while the page is already served; a failure is shown in the
    # status line, and the first request that needs the model tries again and says why.
    start_preparation(model_name)
    demo.launch(**launch_settings())
