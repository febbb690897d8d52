"""Running one job of a browser session: its turns on the shared cores, streaming from a worker thread,
progress, its place in the line, and cancel."""
from __future__ import annotations

import contextvars
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ...core.progress import Cancelled, waits_handled_by
from ..scheduler import Turn
from . import config
from .sessions import Workspace


def streamed(work, report: JobReport, every: float | None = None):
    """Run ``work(emit)`` as ``report``'s job in a thread; yield ``(False, [items emitted since the last yield])``
    as it goes, at most once per ``every`` seconds (config.STREAM_SECONDS), then ``(True, its return value)``.

    The thread runs in a copy of this context, so Gradio's progress bar still reaches the page; an
    exception in ``work`` is raised here. Once the job is cancelled this returns within config.STOP_POLL_SECONDS
    by raising Cancelled, leaving the thread to stop at its own next check: Gradio counts a job as
    pending, and drops clicks on its button, until the handler returns, and a pass of the engine can take
    many seconds before it looks at its cancel flag.
    """
    every = config.STREAM_SECONDS if every is None else every
    stopped = report.cancelled
    items: queue.Queue = queue.Queue()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            with report.turns():
                value = work(lambda item: items.put(("item", item)))
            items.put(("done", value))
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
            items.put(("error", error))

    threading.Thread(target=context.run, args=(run,), daemon=True, name="streamed-job").start()
    pending: list = []
    shown = 0.0
    while True:
        wait = max(0.0, every - (time.monotonic() - shown)) if pending else None
        wait = config.STOP_POLL_SECONDS if wait is None else min(wait, config.STOP_POLL_SECONDS)
        try:
            what, value = items.get(timeout=wait)
        except queue.Empty:  # the pending items have waited long enough, or it is time to look at the flag
            what, value = "flush", None
        if stopped() and what != "done":
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


def in_worker(work, report: JobReport):
    """``work()``'s value, computed as ``report``'s job in a thread that this caller stops waiting for once the
    job is cancelled.

    For read-only jobs only: an abandoned job finishes its current step in the background, so a job that
    changes the session (an edit) must stay in the handler's own thread (:meth:`JobReport.turns`) and stop at
    the engine's checks.
    """
    for finished, value in streamed(lambda emit: work(), report):
        if finished:
            return value
    raise AssertionError("streamed ended without a value")


def place_shown_by(progress) -> Callable[[int], None]:
    """A waiting job's place in the line, said on its progress bar."""
    def show(ahead: int) -> None:
        if ahead:
            progress(0.0, desc=f"waiting: {ahead} job{'' if ahead == 1 else 's'} ahead of yours")

    return show


class JobReport:
    """The progress callback of one job of a session; it stops the job once the session pressed cancel.

    Each job has a cancel flag of its own, registered with its session: Cancel stops every job of the session
    that is still running (a sweep's worker thread as well as a trace started after it), and a job started right
    after a cancel does not clear the flag that the cancelled job has yet to see.
    """

    def __init__(self, workspace: Workspace, progress=None) -> None:
        self._flag = workspace.new_job()
        self._progress = progress or (lambda fraction, desc="": None)
        self._workspace = workspace
        self._turn: Turn | None = None
        self._thread: int | None = None

    @contextmanager
    def turns(self, last: bool = True) -> Iterator[None]:
        """Run the body as this job of the app's scheduler (explorer/app/scheduler.py), in the calling thread: it
        starts at its turn, and each progress report is a step where it may hand the turn to another visitor's
        job, setting aside the model's lock and this session's edits while it waits.

        With ``last=False`` the job goes on in a later ``turns`` block (a handler that yields a stage to its page
        in between): it holds no turn meanwhile, so a page slow to ask for the next stage stalls nobody, and a
        generator Gradio drops ends its job when this report is collected.
        """
        scheduler = config.SCHEDULER
        if self._turn is None:
            weights = self._workspace.session.handle.weights
            # The turn must not hold this report (its bound methods would): its finalizer ends a dropped job.
            self._turn = scheduler.enter(self._workspace, self._flag.is_set, weights.set_aside, place_shown_by(self._progress))
            weakref.finalize(self, scheduler.finish, self._turn)
        else:
            scheduler.resume(self._turn)
        turn, self._thread = self._turn, threading.get_ident()
        finished = last
        try:
            with waits_handled_by(turn.waiting_for_others):
                yield
        except BaseException:
            finished = True
            raise
        finally:
            self._thread = None
            if finished:
                scheduler.finish(turn)
            else:
                scheduler.pause(turn)

    def shown(self, stage: int) -> None:
        """The visitor now sees this much of the job's result (scheduler.FIRST_SHOWN, MAIN_SHOWN)."""
        if self._turn is not None:
            self._turn.shown(stage)

    def __call__(self, fraction: float, message: str) -> None:
        if self._flag.is_set():
            raise Cancelled("cancelled")
        if self._turn is not None and self._thread == threading.get_ident():
            self._turn.step()
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
