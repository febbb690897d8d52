"""What a loaded model remembers about itself, in two kinds kept apart.

* :class:`OwnWeightsValues`: values computed from the model's own weights (its fingerprint, σ of its
  embeddings, the default edit layer, context prefixes, key statistics). They hold for as long as the
  model is loaded, whatever edits sessions apply; each is computed once.
* :class:`CurrentWeightsValue`: one value computed from the weights as they are now, edits included
  (the keys/values of an edit's context columns). It is valid only under the weights state it was
  computed in (``LoadedModel.weights_state``, which every applied block of edits sets anew).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal, TypeVar

from .progress import Progress, no_progress

T = TypeVar("T")
# The kinds of own-weights values; a key is (kind, its parameters...).
OwnValueKind = Literal["fingerprint", "embedding_std", "context_prefixes", "traced_peak_layer", "second_moment", "probe_facts", "baseline_fluency"]
WAIT_SECONDS = 0.5  # how often a thread waiting for another's computation reports progress (and may be cancelled)


class OwnWeightsValues:
    """Values derived from a model's own weights, keyed by ``(kind, parameters...)``, computed once each."""

    def __init__(self) -> None:
        self._values: dict[tuple, object] = {}
        self._computing: dict[tuple, threading.Lock] = {}
        self._registry = threading.Lock()

    def get(self, key: tuple, compute: Callable[[], T], waiting: Progress = no_progress, may_wait: bool = True) -> T:
        """``compute()``'s value for ``key``, computed by the first thread that asks.

        A thread that asks while another computes the same key waits for that result, reporting to
        ``waiting`` meanwhile (so a waiting job can be cancelled), unless ``may_wait`` is false: then it
        computes the value itself (the caller holds a lock the computing thread may need).
        """
        if key in self._values:
            return self._values[key]
        with self._registry:
            computing = self._computing.setdefault(key, threading.Lock())
        acquired = computing.acquire(blocking=False)
        while not acquired and may_wait:
            waiting(0.0, "waiting for the model's preparation")
            acquired = computing.acquire(timeout=WAIT_SECONDS)
        try:
            if key not in self._values:
                self._values[key] = compute()
            return self._values[key]
        finally:
            if acquired:
                computing.release()

    def forget(self) -> None:
        """Drop every value (they are computed again, or read from their disk caches, when next asked for)."""
        self._values.clear()


class CurrentWeightsValue:
    """The last value computed under one weights state and key; asked under another, it is computed afresh."""

    def __init__(self) -> None:
        self._kept: tuple[object, tuple, object] | None = None

    def get(self, weights_state: object, key: tuple, compute: Callable[[], T]) -> T:
        kept = self._kept
        if kept is not None and kept[0] is weights_state and kept[1] == key:
            return kept[2]
        value = compute()
        self._kept = (weights_state, key, value)
        return value

    @property
    def value(self) -> object | None:
        """The value kept now (None before the first computation)."""
        return None if self._kept is None else self._kept[2]
