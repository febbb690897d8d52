"""How long work reports how far it got, and how it is stopped.

Every engine takes one ``progress(fraction, message)`` callback and calls it between its steps. The
callback is also the one way to stop a job: it raises :class:`Cancelled`, and the engine unwinds
(restoring any weights and hooks it changed) as for any other error.
"""
from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


class Cancelled(RuntimeError):
    """A job stopped because its user asked it to (raised by a progress callback)."""


def no_progress(_fraction: float, _message: str) -> None:
    """The progress callback of a job nobody watches or cancels."""


def part_of(progress: Progress, start: float, stop: float, label: str = "") -> Progress:
    """``progress`` for one step of a larger job: its 0..1 maps onto ``start..stop``, its messages get ``label``."""
    return lambda fraction, message: progress(start + (stop - start) * fraction, f"{label}{message}")
