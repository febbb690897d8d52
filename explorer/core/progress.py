"""How long work reports how far it got, and how it is stopped.

Every engine takes one ``progress(fraction, message)`` callback and calls it between its steps. The
callback is also the one way to stop a job: it raises :class:`Cancelled`, and the engine unwinds
(restoring any weights and hooks it changed) as for any other error.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

Progress = Callable[[float, str], None]
_waits = threading.local()  # how this thread's job waits for another thread's work (see waiting_for_others)


class Cancelled(RuntimeError):
    """A job stopped because its user asked it to (raised by a progress callback)."""


def no_progress(_fraction: float, _message: str) -> None:
    """The progress callback of a job nobody watches or cancels."""


def part_of(progress: Progress, start: float, stop: float, label: str = "") -> Progress:
    """``progress`` for one step of a larger job: its 0..1 maps onto ``start..stop``, its messages get ``label``."""
    return lambda fraction, message: progress(start + (stop - start) * fraction, f"{label}{message}")


@contextmanager
def waits_handled_by(handler: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """In this thread, run every :func:`waiting_for_others` block inside ``handler()`` (a scheduler taking turns
    between jobs lets other jobs run while this one cannot go on)."""
    previous = getattr(_waits, "handler", None)
    _waits.handler = handler
    try:
        yield
    finally:
        _waits.handler = previous


def waiting_for_others() -> AbstractContextManager:
    """Wrap a wait for work that another thread does: a job that holds a turn gives it up meanwhile, since the
    thread it waits for may need that turn to finish."""
    handler = getattr(_waits, "handler", None)
    return nullcontext() if handler is None else handler()
