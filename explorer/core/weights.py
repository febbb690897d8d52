"""The one owner of a loaded model's weights: their lock, the model's own matrices while edits are applied,
the weights' state, and the values derived from them.

Sessions share one model; each carries its edits onto it only inside :meth:`Weights.edited`, under the lock,
so another session's passes (which take the same lock, :meth:`Weights.locked`) never see them. Leaving the
block copies the saved matrices back, so the weights return bit for bit.

Values derived from the model (its fingerprint, σ of its embeddings, the default edit layer, context
prefixes, key statistics, the probe facts) are cached under the model's fingerprint, so they must be
computed on the model's own weights whoever asks, also from inside an ``edited`` block. :meth:`derived`
sees to that: while its computation runs, every pass that thread makes through :meth:`locked` runs with the
edited matrices swapped out for the model's own. The lock is taken pass by pass, so other sessions' traces
run in between the batches of a long statistics pass.

Two kinds of remembered values are kept apart: *own-weights* values (:meth:`derived`), which hold as long as
the model is loaded, and one *current-weights* value (:meth:`current`, the keys/values of an edit's context
columns), valid only under the weights state it was computed in; each ``edited`` block sets a new state.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, TypeVar

import torch

from .progress import Progress, no_progress, waiting_for_others

if TYPE_CHECKING:  # architectures does not need this module; only the annotation does
    from .architectures import Architecture

T = TypeVar("T")
# The kinds of own-weights values; a key is (kind, its parameters...).
OwnValueKind = Literal["fingerprint", "embedding_std", "context_prefixes", "traced_peak_layer", "second_moment", "probe_facts", "baseline_fluency"]
WAIT_SECONDS = 0.5  # how often a thread waiting for another's computation reports progress (and may be cancelled)


class Weights:
    """The lock over a model's weights, its own matrices while edits are applied, and the values derived from them."""

    def __init__(self, arch: Architecture) -> None:
        self._arch = arch
        self._lock = threading.RLock()
        self._holder: int | None = None  # the thread holding the lock (an RLock does not say, publicly)
        self._depth = 0
        # The model's own MLP output matrices (Architecture.save_mlp_out tokens) of the layers that an open
        # edited() block changed.
        self._originals: dict[int, object] = {}
        # None while the weights are the model's own; a token unique to each edited() block otherwise.
        self._state: object | None = None
        self._deriving = threading.local()
        self._own_values: dict[tuple, object] = {}
        self._computing: dict[tuple, threading.Lock] = {}
        self._registry = threading.Lock()
        self._current: tuple[object, tuple, object] | None = None

    # --- the lock ------------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock for a pass over the weights as they are now (a session's edits, inside its ``edited``
        block); inside a derived value's computation, over the model's own weights."""
        if getattr(self._deriving, "depth", 0):
            with self.own():
                yield
            return
        with self._held():
            yield

    @contextmanager
    def _held(self) -> Iterator[None]:
        with self._lock:
            self._holder, self._depth = threading.get_ident(), self._depth + 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._holder = None

    def held(self) -> bool:
        """Whether the calling thread holds the lock (inside an ``edited`` block, for one)."""
        return self._holder == threading.get_ident()

    @contextmanager
    def set_aside(self) -> Iterator[None]:
        """Give up this thread's hold on the lock for the body, with the model's own weights put back; on exit
        take the lock again (as deep as before) with this thread's edited matrices back in place.

        A scheduler that takes turns between jobs calls it between a job's steps, so that another job's steps
        run, under their own edits, while this one waits in the middle of its ``edited`` and ``locked``
        blocks. Outside the lock it does nothing.
        """
        if not self.held():
            yield
            return
        # Hooks of a pass in progress would act on the next job's passes: engines report progress between passes.
        hooked = [name for name, module in self._arch.model.named_modules() if module._forward_hooks or module._forward_pre_hooks]
        if hooked:
            raise RuntimeError(f"a job stepped aside with hooks on the shared model ({', '.join(hooked[:3])}): progress "
                               "must be reported between passes, never inside a hook's context")
        arch, depth = self._arch, self._depth
        in_place = {layer: arch.save_mlp_out(layer) for layer in self._originals}
        for layer, original in self._originals.items():
            arch.restore_mlp_out(layer, original)
        originals, state = self._originals, self._state
        self._originals, self._state, self._holder, self._depth = {}, None, None, 0
        for _ in range(depth):
            self._lock.release()
        try:
            yield
        finally:
            for _ in range(depth):
                self._lock.acquire()
            self._holder, self._depth = threading.get_ident(), depth
            self._originals, self._state = originals, state
            for layer, matrix in in_place.items():
                arch.restore_mlp_out(layer, matrix)

    # --- which weights are in place ----------------------------------------------------------------

    @contextmanager
    def own(self) -> Iterator[None]:
        """Hold the lock with the model's own weights in place, also inside an ``edited`` block (whose matrices
        are swapped out for the body and back afterwards)."""
        with self._held():
            swapped: dict[int, object] = {}
            state = self._state
            try:
                for layer, original in self._originals.items():
                    swapped[layer] = self._arch.save_mlp_out(layer)
                    self._arch.restore_mlp_out(layer, original)
                self._state = None
                yield
            finally:
                for layer, saved in swapped.items():
                    self._arch.restore_mlp_out(layer, saved)
                self._state = state

    @contextmanager
    def edited(self, updates: Sequence[tuple[int, Callable[[], torch.Tensor]]]) -> Iterator[None]:
        """Hold the lock with each ``(layer, ΔW)`` added to that layer's MLP output matrix, in order; restore the
        exact matrices on exit. ``ΔW()`` gives the float64 [out, in] update."""
        arch = self._arch
        with self._held():
            saved: dict[int, object] = {}
            registered: list[int] = []
            previous_state = self._state
            try:
                if updates:
                    self._state = object()  # values computed from the weights are not reused in here
                for layer, update in updates:
                    if layer not in saved:
                        saved[layer] = arch.save_mlp_out(layer)
                        if layer not in self._originals:  # an enclosing block already holds the model's own
                            self._originals[layer] = saved[layer]
                            registered.append(layer)
                    # Read and written through the architecture: an offloaded weight (a meta placeholder that
                    # accelerate fills at each forward) is edited in its offload map, not in the placeholder.
                    weight = arch.mlp_out_values(layer)
                    with torch.no_grad():
                        changed = weight.double() + update().to(weight.device)
                    arch.write_mlp_out(layer, changed.to(weight.dtype))
                yield
            finally:
                for layer, original in saved.items():
                    arch.restore_mlp_out(layer, original)
                for layer in registered:
                    del self._originals[layer]
                self._state = previous_state

    # --- derived values ----------------------------------------------------------------------------

    @contextmanager
    def deriving(self) -> Iterator[None]:
        """Every pass this thread makes through :meth:`locked` in here runs on the model's own weights (for work
        derived from them that is not cached as one value, such as statistics of many layers written to disk)."""
        self._deriving.depth = getattr(self._deriving, "depth", 0) + 1
        try:
            yield
        finally:
            self._deriving.depth -= 1

    def derived(self, key: tuple, compute: Callable[[], T], waiting: Progress = no_progress) -> T:
        """The own-weights value ``key`` = (kind, parameters...), computed once by the first thread that asks, its
        passes on the model's own weights (:meth:`deriving`).

        A thread that asks while another computes the same key waits for that result, reporting to ``waiting``
        meanwhile (so a waiting job can be cancelled), unless it holds the lock: then it computes the value
        itself, since the computing thread may need the lock.
        """
        if key in self._own_values:
            return self._own_values[key]
        with self._registry:
            computing = self._computing.setdefault(key, threading.Lock())
        acquired = computing.acquire(blocking=False)
        if not acquired and not self.held():
            with waiting_for_others():  # the whole wait: a scheduler's other jobs (the computing one too) go on
                while not acquired:
                    waiting(0.0, "waiting for the model's preparation")
                    acquired = computing.acquire(timeout=WAIT_SECONDS)
        try:
            if key not in self._own_values:
                with self.deriving():
                    self._own_values[key] = compute()
            return self._own_values[key]
        finally:
            if acquired:
                computing.release()

    def forget_derived(self) -> None:
        """Drop every derived value (computed again, or read from their disk caches, when next asked for)."""
        self._own_values.clear()

    def current(self, key: tuple, compute: Callable[[], T]) -> T:
        """The value ``key`` on the weights as they are now: kept while the weights state is the one it was
        computed under, computed afresh under another (call it holding the lock)."""
        kept = self._current
        if kept is not None and kept[0] is self._state and kept[1] == key:
            return kept[2]
        value = compute()
        self._current = (self._state, key, value)
        return value

    @property
    def current_value(self) -> object | None:
        """The current-weights value kept now (None before the first computation)."""
        return None if self._current is None else self._current[2]
