"""The app's scheduler: one job step at a time, new work first, long work shared, a visitor's jobs in order,
cancel at once, each step under its own session's weights."""
from __future__ import annotations

import threading
import time

import torch

from explorer.app.scheduler import FIRST_SHOWN, MAIN_SHOWN, URGENT_SECONDS, Scheduler
from explorer.core.progress import Cancelled, waiting_for_others, waits_handled_by
from tests.conftest import build_tiny


class Visitor:
    """A session: an identity the scheduler orders jobs by."""


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Jobs:
    """Jobs of made-up steps in threads; ``log`` records (job, step) as each step runs, and how many ran at once."""

    def __init__(self) -> None:
        self.scheduler = Scheduler()
        self.log: list[tuple[str, int]] = []
        self.running_now = 0
        self.most_at_once = 0
        self.errors: dict[str, BaseException] = {}
        self.places: dict[str, list[int]] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name, owner, steps, stage_after=(), gate=None, cancelled=lambda: False):
        """A job of ``steps`` steps; ``stage_after`` = {step: stage} it reports as shown; ``gate`` (step → callable)
        runs while the job still holds the turn at the end of that step, before it offers the turn."""
        self.places[name] = []

        def run():
            try:
                with self.scheduler.job(owner, cancelled, waiting=self.places[name].append) as turn:
                    for step in range(steps):
                        self.running_now += 1
                        self.most_at_once = max(self.most_at_once, self.running_now)
                        self.log.append((name, step))
                        time.sleep(0.002)
                        self.running_now -= 1
                        if step in dict(stage_after):
                            turn.shown(dict(stage_after)[step])
                        if gate and step in gate:
                            gate[step]()
                        turn.step()
                        if cancelled():  # as the app's progress report does once the job has the turn back
                            self.log.append((name, "left"))
                            raise Cancelled("cancelled")
            except BaseException as error:  # noqa: BLE001 - the test looks at it
                self.errors[name] = error

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def start_held(self, name, owner, steps, hold_at, until_running, **kwargs):
        """Start a job that, at the end of step ``hold_at``, keeps the turn until ``until_running`` jobs are in the
        line; return once it got there (so the jobs started next arrive while it runs)."""
        there = threading.Event()
        hold = {hold_at: lambda: (there.set(), wait_until(lambda: self.scheduler.running() == until_running))}
        self.start(name, owner, steps, gate=hold, **kwargs)
        assert there.wait(5)

    def join(self):
        for thread in self.threads:
            thread.join(timeout=20)
            assert not thread.is_alive()

    def order(self, name):
        return [i for i, (job, _step) in enumerate(self.log) if job == name]


def test_a_new_job_goes_before_long_work_already_running_and_only_one_step_runs_at_a_time():
    jobs = Jobs()
    long_owner, new_owner = Visitor(), Visitor()
    # The long job has shown its main result after its first step; at its second step a new visitor arrives.
    jobs.start_held("long", long_owner, 8, hold_at=1, until_running=2, stage_after={0: MAIN_SHOWN})
    jobs.start("new", new_owner, 3, stage_after={2: MAIN_SHOWN})
    jobs.join()
    assert not jobs.errors
    assert jobs.most_at_once == 1
    # Steps 0-1 of the long job, then the new job's steps (it has shown nothing: it goes first), then the rest.
    assert jobs.log[:5] == [("long", 0), ("long", 1), ("new", 0), ("new", 1), ("new", 2)]
    assert jobs.order("long")[2:] == list(range(5, 11))


def test_long_jobs_of_different_visitors_share_the_turns_step_by_step():
    jobs = Jobs()
    first, second = Visitor(), Visitor()
    jobs.start_held("a", first, 6, hold_at=0, until_running=2, stage_after={0: MAIN_SHOWN})
    jobs.start("b", second, 6, stage_after={0: MAIN_SHOWN})
    jobs.join()
    names = [job for job, _ in jobs.log]
    # After the newcomer's first step, the two alternate: neither runs two steps in a row while the other waits.
    switches = sum(1 for x, y in zip(names[1:], names[2:]) if x != y)
    assert names[:2] == ["a", "b"]
    assert switches >= 9, names


def test_a_visitors_own_jobs_run_in_the_order_they_were_started():
    jobs = Jobs()
    visitor, other = Visitor(), Visitor()
    jobs.start_held("first", visitor, 4, hold_at=0, until_running=3, stage_after={0: MAIN_SHOWN})
    jobs.start("second", visitor, 2)  # shown nothing yet, but behind its own visitor's first job
    wait_until(lambda: jobs.scheduler.running() == 2)
    jobs.start("other", other, 2)
    jobs.join()
    assert max(jobs.order("first")) < min(jobs.order("second"))
    assert min(jobs.order("other")) < min(jobs.order("second"))
    # While it waited, the second job was told how many go before it (its own visitor's first job among them).
    assert jobs.places["second"] and min(jobs.places["second"]) >= 1


def test_a_waiting_job_is_told_its_place_and_a_cancelled_one_leaves_without_running():
    jobs = Jobs()
    release = threading.Event()
    cancel_second = threading.Event()
    jobs.start("holder", Visitor(), 1, gate={0: lambda: release.wait(5)})
    wait_until(lambda: jobs.log)
    jobs.start("waiting", Visitor(), 1)
    wait_until(lambda: jobs.places["waiting"])
    jobs.start("third", Visitor(), 1, cancelled=cancel_second.is_set)
    wait_until(lambda: jobs.places["third"])
    assert jobs.places["waiting"][0] == 1 and jobs.places["third"][0] == 2  # "1 job ahead", "2 jobs ahead"
    cancel_second.set()
    jobs.threads[-1].join(timeout=5)
    assert isinstance(jobs.errors.get("third"), Cancelled)
    release.set()
    jobs.join()
    assert [job for job, _ in jobs.log] == ["holder", "waiting"]


def test_a_cancelled_job_parked_mid_run_gets_the_next_turn():
    jobs = Jobs()
    cancel = threading.Event()
    arrived = threading.Event()
    jobs.start("cancelled", Visitor(), 20, stage_after={0: MAIN_SHOWN}, cancelled=cancel.is_set)
    wait_until(lambda: jobs.log)
    jobs.start("busy", Visitor(), 30, stage_after={0: MAIN_SHOWN},
               gate={3: lambda: (cancel.set(), arrived.set())})
    jobs.join()
    busy_steps = jobs.order("busy")
    # Right after the cancel (at the end of the busy job's 4th step), the cancelled job takes the next turn and leaves.
    assert jobs.log.index(("cancelled", "left")) == busy_steps[3] + 1
    assert isinstance(jobs.errors["cancelled"], Cancelled) and "busy" not in jobs.errors


def test_a_job_waiting_for_another_threads_work_gives_the_turn_up():
    """A new job (first in line) that waits for a value a long job computes must not hold the turn meanwhile:
    otherwise neither moves (the long job never gets a step)."""
    jobs = Jobs()
    value_ready = threading.Event()
    started = threading.Event()
    outcome = {}

    def long_job():
        with jobs.scheduler.job(Visitor()) as turn:
            turn.shown(MAIN_SHOWN)
            started.set()
            for _ in range(20):
                time.sleep(0.01)
                turn.step()
            value_ready.set()

    def waiting_job():
        with jobs.scheduler.job(Visitor()) as turn, waits_handled_by(turn.waiting_for_others):
            while not value_ready.is_set():
                turn.step()
                with waiting_for_others():
                    value_ready.wait(0.05)
            outcome["waited"] = True

    threads = [threading.Thread(target=long_job, daemon=True)]
    threads[0].start()
    started.wait(5)
    threads.append(threading.Thread(target=waiting_job, daemon=True))
    threads[1].start()
    began = time.monotonic()
    for thread in threads:
        thread.join(timeout=15)
    assert outcome == {"waited": True}
    # The long job needs 0.2 s of turns; held by the waiting job, they would come only once it stopped being
    # urgent (URGENT_SECONDS of turns).
    assert time.monotonic() - began < URGENT_SECONDS / 4


def test_the_first_result_of_a_new_job_goes_before_the_main_result_of_another():
    """Two new traces: the second one's estimate (nothing shown yet) runs before the first one's exact cells
    (estimate shown), so every visitor sees an estimate before anyone's exact trace goes on."""
    jobs = Jobs()
    jobs.start_held("first", Visitor(), 5, hold_at=0, until_running=2, stage_after={0: FIRST_SHOWN, 2: MAIN_SHOWN})
    jobs.start("second", Visitor(), 3, stage_after={0: FIRST_SHOWN, 1: MAIN_SHOWN})
    jobs.join()
    assert jobs.log[:3] == [("first", 0), ("second", 0), ("first", 1)]


def test_each_step_runs_under_the_weights_of_the_session_it_belongs_to():
    """Two jobs with different edits of the same model take turns in the middle of their edited blocks: every
    step sees its own edit, and the weights come back bit for bit."""
    handle = build_tiny("llama")
    weights, arch = handle.weights, handle.arch
    original = arch.mlp_out_weight(0).detach().clone()
    shape = original.shape
    scheduler = Scheduler()
    seen: dict[str, list[bool]] = {"a": [], "b": []}
    log: list[str] = []
    deltas = {"a": torch.full(shape, 0.5, dtype=torch.float64), "b": torch.full(shape, -0.25, dtype=torch.float64)}
    both = threading.Barrier(2)

    def job(name):
        both.wait()
        expected = (original.double() + deltas[name]).to(original.dtype)
        with scheduler.job(name, set_aside=weights.set_aside) as turn:
            turn.shown(MAIN_SHOWN)
            wait_until(lambda: scheduler.running() == 2)
            with weights.edited([(0, lambda: deltas[name])]), weights.locked():
                for _ in range(5):
                    log.append(name)
                    seen[name].append(torch.equal(arch.mlp_out_weight(0), expected))
                    turn.step()

    threads = [threading.Thread(target=job, args=(name,), daemon=True) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert seen == {"a": [True] * 5, "b": [True] * 5}
    assert sum(1 for x, y in zip(log, log[1:]) if x != y) >= 5, log  # they did interleave
    assert torch.equal(arch.mlp_out_weight(0), original)
    assert not weights.held()
