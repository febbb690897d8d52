"""Start-up work on a shared model, in the background: load it, then prepare what its first edit needs.

The app starts serving its page at once and runs this in a thread; the page's model status line reads
:meth:`Preparation.status`. An edit requested meanwhile asks :func:`editing.plan_edit` for the same
values and waits for this work instead of repeating it (:meth:`Weights.derived <explorer.core.weights.Weights.derived>`); traces run in
between, since the statistics pass takes the model's lock one batch at a time.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..core.errors import InputError, ModelLoadError
from ..core.models import LoadedModel
from ..core.progress import part_of
from ..editing import EditOptions, plan_edit
from ..studies.health import baseline_fluency, probe_facts


@dataclass(frozen=True)
class Status:
    """Where the preparation stands: a line for the page and whether it is still running."""

    fraction: float
    message: str
    running: bool
    failed: bool = False
    loaded: bool = False  # the model is loaded (its edits may still be being prepared)

    def to_json(self) -> dict:
        """The status as plain values (the app's ``/model_status`` endpoint)."""
        return asdict(self)


class Preparation:
    """Loads one model and prepares its default edit (layer, context prefixes, key statistics), once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._status = Status(0.0, "waiting to start", running=True)
        self._thread: threading.Thread | None = None

    def start(self, load: Callable[..., LoadedModel], options: EditOptions) -> Preparation:
        """Run ``load(progress=...)`` and then :func:`editing.plan_edit` in a daemon thread.

        A second call does nothing while the work runs or after it succeeded; after a failure it tries again.
        """
        with self._lock:
            if self._thread is None or (not self._thread.is_alive() and self._status.failed):
                self._status = Status(0.0, "waiting to start", running=True)
                self._thread = threading.Thread(target=self._run, args=(load, options), daemon=True, name=f"prepare-{self.name}")
                self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> Status:
        """Block until the work is done (or ``timeout`` seconds passed); the status then."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def status(self) -> Status:
        """The latest status."""
        with self._lock:
            return self._status

    def _report(self, fraction: float, message: str, running: bool = True, failed: bool = False, loaded: bool = False) -> None:
        with self._lock:
            loaded = loaded or self._status.loaded  # once loaded, the model stays loaded
            self._status = Status(min(1.0, max(0.0, fraction)), message, running, failed, loaded)

    def _run(self, load: Callable[..., LoadedModel], options: EditOptions) -> None:
        try:
            handle = load(progress=part_of(self._report, 0, 0.3, "loading the model: "))
            self._report(0.3, "loaded; preparing edits", loaded=True)
            prepared = plan_edit(handle, options, part_of(self._report, 0.3, 0.95, "preparing edits: "))
            # What the health line after an edit compares with: measured now, not during the first edit.
            self._report(0.95, "preparing edits: the model's probe facts and fluency")
            probe_facts(handle)
            baseline_fluency(handle)
        except (InputError, ModelLoadError) as error:  # a clear message already
            self._report(1.0, str(error), running=False, failed=True)
            return
        except Exception as error:  # noqa: BLE001 - shown on the page; the first request that needs the model tries again
            self._report(1.0, f"{type(error).__name__}: {error}".splitlines()[0], running=False, failed=True)
            return
        if prepared.moment is None or prepared.moment.matrix is None:
            where = "no key statistics"
        else:
            where = f"C from {prepared.moment.count:,} keys of {prepared.moment.spec.corpus}"
        self._report(1.0, f"ready to edit (default layer {prepared.layer}; {where})", running=False)
