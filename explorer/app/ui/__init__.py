"""The Gradio app: layout and event wiring only; the engines do the work.

* ``config``: limits, edit options and the trace cache every handler reads.
* ``inputs``: values typed into the page, checked.
* ``errors``: the engines' clear errors as Gradio messages.
* ``jobs``: one job of a session: its turns on the cores, a worker thread that a cancel stops waiting for, progress, cancel.
* ``sessions``: the shared models and each browser session's state (its model, edits and files).
* ``trace_handlers``, ``edit_handlers``, ``sweep_handlers``, ``average_handlers``: what each tab's buttons run.
* ``layout``: the page and its wiring. ``serving``: its queue and Gradio's caps; ``launch`` starts it. ``lazy_panels``: fields in panels Gradio draws late
  (a closed accordion, a later tab) keep what is typed the moment they appear.

Data flow: a button → its handler → ``inputs`` checks → the engine (tracing, editing, aggregate) on the
session's model with its edits applied → ``plots``/``export`` → the page.
"""
from .average_handlers import run_average, run_severed
from .config import LIMITS
from .edit_handlers import complete_prompts, fill_from_case, reset_edits, run_edit, sample_case_labels, toggle_edit, undo_edit
from .jobs import CANCELLED_NOTE, cancel_job
from .layout import build_app
from .serving import launch, launch_settings, queued_app
from .sessions import Workspace, load_session_model, preparation_status, status_line
from .trace_handlers import compare_traces, inspect_trace_cell, peak_mlp_layer, run_trace

__all__ = [
    "CANCELLED_NOTE", "LIMITS", "Workspace", "build_app", "cancel_job", "compare_traces", "complete_prompts", "fill_from_case",
    "inspect_trace_cell", "launch", "launch_settings", "load_session_model", "peak_mlp_layer", "preparation_status", "queued_app", "reset_edits", "run_average",
    "run_edit", "run_severed", "run_trace", "sample_case_labels", "status_line", "toggle_edit", "undo_edit",
]
