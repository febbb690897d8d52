"""Start-up preparation: an edit asked for meanwhile waits for it instead of repeating it, other jobs run in
between its batches, and a caller holding the model's lock never deadlocks with it."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from explorer.app.preparation import Preparation
from explorer.core.weights import Weights
from explorer.editing import EditOptions, plan_edit
from explorer.editing import statistics as stats
from explorer.editing.statistics import StatsSpec
from tests.conftest import build_tiny

OPTIONS = EditOptions(layer=1, prefixes=((3, 2),), stats=StatsSpec(corpus="wikipedia", tokens=20_000))


@pytest.fixture()
def slow_passes(tmp_path, monkeypatch):
    """Counts statistics passes and pauses after each batch, so the tests can act while a pass runs."""
    monkeypatch.setenv("ROME_EXPLORER_CACHE", str(tmp_path / "cache"))
    passes: list[int] = []
    accumulate, own = stats.accumulate_second_moments, Weights.own

    def counted(*args, **kwargs):
        passes.append(1)
        return accumulate(*args, **kwargs)

    @contextmanager
    def pausing(weights):
        with own(weights):
            yield
        time.sleep(0.05)

    monkeypatch.setattr(stats, "accumulate_second_moments", counted)
    monkeypatch.setattr(Weights, "own", pausing)
    return passes


def _until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_edit_during_the_preparation_waits_for_it_and_other_jobs_run_in_between(slow_passes):
    handle = build_tiny("llama")
    preparation = Preparation("tiny").start(lambda progress: handle, OPTIONS)
    _until(lambda: "key statistics:" in preparation.status().message)
    # Another job (a trace) takes the model's lock between two batches of the running pass.
    running_when_taken = []

    def take() -> None:
        with handle.weights.locked():
            running_when_taken.append(preparation.status().running)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(10)
    assert running_when_taken == [True], "the lock was only free once the pass had finished"
    prepared = plan_edit(handle, OPTIONS)  # an edit clicked meanwhile
    assert len(slow_passes) == 1, "the edit computed the statistics again instead of waiting"
    status = preparation.wait(120)
    assert not status.running and not status.failed and status.fraction == 1.0
    assert status.message == f"ready to edit (default layer 1; C from {prepared.moment.count:,} keys of wikipedia)"
    assert prepared.moment is plan_edit(handle, OPTIONS).moment and len(slow_passes) == 1


def test_a_caller_holding_the_models_lock_computes_itself_instead_of_deadlocking(slow_passes):
    handle = build_tiny("llama")
    preparation = Preparation("tiny").start(lambda progress: handle, OPTIONS)
    _until(lambda: "key statistics:" in preparation.status().message)
    results = []

    def edit_inside_an_applied_block() -> None:
        with handle.weights.locked():  # as EditSession.applied() holds it
            results.append(plan_edit(handle, OPTIONS))

    worker = threading.Thread(target=edit_inside_an_applied_block, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "deadlock: the lock holder waited for a pass that needs the lock"
    assert preparation.wait(120).running is False
    assert len(results) == 1 and len(slow_passes) == 2


def test_a_failed_preparation_says_why():
    def broken(progress):
        raise RuntimeError("disk full\nand more")

    status = Preparation("broken").start(broken, OPTIONS).wait(30)
    assert status.failed and not status.running and status.message == "RuntimeError: disk full"


def test_a_failed_preparation_runs_again_when_started_again():
    attempts = []

    def flaky(progress):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("network down")
        return build_tiny("llama")

    preparation = Preparation("flaky")
    assert preparation.start(flaky, EditOptions(layer=1, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))).wait(30).failed
    status = preparation.start(flaky, EditOptions(layer=1, prefixes=((3, 2),), stats=StatsSpec(corpus="identity"))).wait(60)
    assert not status.failed and status.loaded and status.message == "ready to edit (default layer 1; no key statistics)"
    preparation.start(flaky, OPTIONS).wait(60)
    assert len(attempts) == 2, "a preparation that succeeded is not run again"
