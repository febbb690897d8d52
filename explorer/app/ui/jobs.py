"""Running one job of a browser session: streaming from a worker thread, progress and cancel."""
from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable

from ...core.progress import Cancelled
from . import config
from .sessions import Workspace


def streamed(work, every: float, stopped: Callable[[], bool] | None = None):
    """Run ``work(emit)`` in a thread; yield ``(False, [items emitted since the last yield])`` as it goes, at
    most once per ``every`` seconds, then ``(True, its return value)``.

    The thread runs in a copy of this context, so Gradio's progress bar still reaches the page; an
    exception in ``work`` is raised here. Once ``stopped()`` is true this returns within config.STOP_POLL_SECONDS
    by raising Cancelled, leaving the thread to stop at its own next check: Gradio counts a job as
    pending, and drops clicks on its button, until the handler returns, and a pass of the engine can take
    many seconds before it looks at its cancel flag.
    """
    items: queue.Queue = queue.Queue()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            items.put(("done", context.run(work, lambda item: items.put(("item", item)))))
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
            items.put(("error", error))

    threading.Thread(target=run, daemon=True, name="streamed-job").start()
    pending: list = []
    shown = 0.0
    while True:
        wait = max(0.0, every - (time.monotonic() - shown)) if pending else None
        if stopped is not None:
            wait = config.STOP_POLL_SECONDS if wait is None else min(wait, config.STOP_POLL_SECONDS)
        try:
            what, value = items.get(timeout=wait)
        except queue.Empty:  # the pending items have waited long enough, or it is time to look at the flag
            what, value = "flush", None
        if stopped is not None and stopped() and what != "done":
            raise Cancelled("cancelled")
        if what == "error":
            raise value
        if what == "item":
            pending.append(value)
        if pending and (what != "item" or time.monotonic() - shown >= every):
            yield False, pending
            pending, shown = [], time.monotonic()
        if what == "done":
            yield True, value
            return


def in_worker(work, stopped: Callable[[], bool]):
    """``work()``'s value, computed in a thread that this caller stops waiting for once ``stopped()`` is true.

    For read-only jobs only: an abandoned job finishes its current step in the background, so a job that
    changes the session (an edit) must stay in the handler's own thread and stop at the engine's checks.
    """
    for finished, value in streamed(lambda emit: work(), config.STREAM_SECONDS, stopped):
        if finished:
            return value
    raise AssertionError("streamed ended without a value")


class JobReport:
    """The progress callback of one job of a session; it stops the job once the session pressed cancel.

    Each job has a cancel flag of its own, registered with its session: Cancel stops every job of the session
    that is still running (a sweep's worker thread as well as a trace started after it), and a job started right
    after a cancel does not clear the flag that the cancelled job has yet to see.
    """

    def __init__(self, workspace: Workspace, progress) -> None:
        self._flag = workspace.new_job()
        self._progress = progress

    def __call__(self, fraction: float, message: str) -> None:
        if self._flag.is_set():
            raise Cancelled("cancelled")
        self._progress(fraction, desc=message)

    def cancelled(self) -> bool:
        """Whether this job was asked to stop (the engines poll it between steps)."""
        return self._flag.is_set()
CANCELLED_NOTE = "cancelled: the job stops at its next step; run it again when you like"


def cancel_job(workspace: Workspace) -> str:
    """Ask this session's running jobs to stop at their next progress step; the note the page shows instead of a result."""
    workspace.cancel_jobs()
    return CANCELLED_NOTE
