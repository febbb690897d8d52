"""A job in parts (the edit panel's stages): between its parts it holds no turn but keeps its visitor's order,
and a handler Gradio drops ends its job."""
from __future__ import annotations

import gc
import threading

from explorer.app import ui
from explorer.app.scheduler import Scheduler
from explorer.app.ui.jobs import JobReport
from explorer.core.models import DEFAULT_MODEL
from tests.conftest import build_tiny


def test_a_job_between_its_parts_lets_others_run_keeps_its_visitors_order_and_ends_when_dropped(monkeypatch):
    handle = build_tiny("llama")
    monkeypatch.setattr(ui.sessions, "shared_model", lambda name=DEFAULT_MODEL, progress=None: handle)
    monkeypatch.setattr(ui.config, "SCHEDULER", Scheduler())
    mine, other = ui.Workspace(), ui.Workspace()
    staged = JobReport(mine)
    with staged.turns(last=False):
        pass  # the first part; the handler would now yield it to the page
    assert ui.config.SCHEDULER.running() == 1

    with JobReport(other).turns():  # another visitor's job gets the turn at once: the paused part holds none
        ran_meanwhile = True
    assert ran_meanwhile

    started = threading.Event()

    def my_next_job() -> None:
        with JobReport(mine).turns():
            started.set()

    thread = threading.Thread(target=my_next_job, daemon=True)
    thread.start()
    assert not started.wait(0.5), "the visitor's next job ran before its staged job was over"
    del staged  # Gradio dropped the handler's generator between two parts
    gc.collect()
    assert started.wait(5), "a dropped staged job kept its visitor's later jobs waiting"
    thread.join(5)
    assert ui.config.SCHEDULER.running() == 0
