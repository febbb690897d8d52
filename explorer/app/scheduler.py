"""Turns on the shared cores: the app's jobs run one step at a time, in an order that is fair to visitors.

A Space has one process on two cores. Running visitors' jobs in parallel threads only slows every one of
them, and running them one after another makes the fourth visitor wait for three whole traces before
seeing anything. So every job runs in its own thread but only while it holds *the turn*, and it offers the
turn back at each of its steps (each progress report of the engines: an estimate's gradient pass, an exact
trace's batched pass, an edit's phase, a sweep's layer). At every step the turn goes to, in this order:

1. a job whose visitor pressed Cancel (it unwinds and leaves at once);
2. a job that has shown its visitor nothing yet, oldest first (a new trace's estimate, a new edit);
3. a job that has shown a first result but not its main one (a trace with its estimate drawn, not yet its
   first exact cells), oldest first;
4. every other job, the one whose last turn is longest ago first, so long jobs of different visitors share
   the cores step by step.

A job counts as 2 or 3 only for its first URGENT_SECONDS of turns (one edit step takes 4-6 s on two
cores), so a long job that never reports a result cannot keep the head of the line. A visitor's own jobs run in the order they were started: only
the oldest unfinished job of each visitor competes for the turn.

A job that waits for another thread's work (a value another job computes) gives the turn up meanwhile
(:func:`explorer.core.progress.waiting_for_others`). Handing the turn over is the job's own business: its
``set_aside`` context releases what it holds (the model's lock, its edits on the weights) for as long as it
waits and takes them back before it goes on, so each step runs under the weights of its own visitor. The
engines report progress only between passes, never while a hook is on the model (the optimisation of v*
reports per try, not per step, for that reason); ``Weights.set_aside`` refuses to step aside otherwise.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

from ..core.progress import Cancelled

URGENT_SECONDS = 10.0  # how long a job that has not shown its main result may go ahead of long work
POLL_SECONDS = 0.2  # how often a waiting job looks at its cancel flag and its place in the line

# Stages a job reports with Turn.shown(): what its visitor sees so far.
NOTHING_SHOWN, FIRST_SHOWN, MAIN_SHOWN = 0, 1, 2


@dataclass(eq=False)
class Turn:
    """One job's place in the line: whose it is, what it has shown, how long it has held the turn."""

    owner: object  # the visitor (a session); its jobs run in the order they arrived
    arrived: int  # arrival order
    cancelled: Callable[[], bool]
    set_aside: Callable[[], AbstractContextManager]  # what the job releases while another holds the turn
    waiting: Callable[[int], None]  # told how many jobs go before it, whenever that changes while it waits
    scheduler: Scheduler
    stage: int = NOTHING_SHOWN
    service: float = 0.0  # seconds this job has held the turn
    last_turn: int = -1  # when it last got the turn (the scheduler's count of turns handed out)
    started: bool = False
    away: bool = False  # waiting for another thread's work: not a candidate for the turn
    held_since: float | None = field(default=None, repr=False)

    def step(self) -> None:
        """A step boundary: go on, or hand the turn to a job that deserves it more and wait for it to come back.
        While the job waits for another thread's work (``away``) it holds no turn, so there is nothing to hand over."""
        if not self.away:
            self.scheduler._step(self)

    def shown(self, stage: int) -> None:
        """The job has shown its visitor this much (FIRST_SHOWN, MAIN_SHOWN): later steps yield to jobs that have shown less."""
        self.stage = max(self.stage, stage)

    @contextmanager
    def waiting_for_others(self) -> Iterator[None]:
        """Give the turn up while this job waits for another thread's work; take it back afterwards."""
        with self.set_aside():
            self.scheduler._leave(self, away=True)
            try:
                yield
            finally:
                self.scheduler._wait_for_turn(self)


class Scheduler:
    """Hands one turn at a time to the jobs of every visitor (the module's docstring says in which order)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._jobs: list[Turn] = []  # unfinished jobs, oldest first
        self._holder: Turn | None = None
        self._arrivals = itertools.count()
        self._turns_given = itertools.count()

    def enter(self, owner: object, cancelled: Callable[[], bool] = lambda: False,
              set_aside: Callable[[], AbstractContextManager] = nullcontext,
              waiting: Callable[[int], None] = lambda ahead: None) -> Turn:
        """A new job of ``owner``, holding its first turn once this returns (Cancelled, and gone, if cancelled
        before it got one). End it with :meth:`finish`."""
        turn = Turn(owner, next(self._arrivals), cancelled, set_aside, waiting, self)
        with self._changed:
            self._jobs.append(turn)
        try:
            self._wait_for_turn(turn)
        except BaseException:
            self.finish(turn)
            raise
        return turn

    def pause(self, turn: Turn) -> None:
        """``turn`` holds no turn until :meth:`resume` (a handler showing a stage to its page meanwhile); it keeps
        its place among its visitor's jobs."""
        self._leave(turn, away=True)

    def resume(self, turn: Turn) -> None:
        """Wait until the paused ``turn`` holds the turn again."""
        self._wait_for_turn(turn)

    def finish(self, turn: Turn) -> None:
        """``turn``'s job is over (calling it again does nothing)."""
        with self._changed:
            self._account(turn)
            if turn in self._jobs:
                self._jobs.remove(turn)
            if self._holder is turn:
                self._holder = None
            self._changed.notify_all()

    @contextmanager
    def job(self, owner: object, cancelled: Callable[[], bool] = lambda: False,
            set_aside: Callable[[], AbstractContextManager] = nullcontext,
            waiting: Callable[[int], None] = lambda ahead: None) -> Iterator[Turn]:
        """Run the body as one job of ``owner``: it starts when the job gets its first turn, and steps aside at
        each :meth:`Turn.step`. Cancelled before its first turn, it raises Cancelled without running."""
        turn = self.enter(owner, cancelled, set_aside, waiting)
        try:
            yield turn
        finally:
            self.finish(turn)

    def running(self) -> int:
        """Unfinished jobs, holding the turn or waiting for it."""
        with self._changed:
            return len(self._jobs)

    # --- internals (call holding _changed unless said otherwise) -----------------------------------------

    def _rank(self, turn: Turn) -> tuple:
        if turn.cancelled():
            return (0, turn.arrived)
        if turn.stage < MAIN_SHOWN and turn.service < URGENT_SECONDS:
            return (1 + turn.stage, turn.arrived)
        return (3, turn.last_turn, turn.arrived)

    def _candidates(self) -> list[Turn]:
        """Each visitor's oldest unfinished job, where it is ready for the turn."""
        first: dict[int, Turn] = {}
        for turn in self._jobs:
            first.setdefault(id(turn.owner), turn)
        return [turn for turn in first.values() if not turn.away]

    def _best(self) -> Turn | None:
        candidates = self._candidates()
        return min(candidates, key=self._rank) if candidates else None

    def _ahead(self, turn: Turn) -> int:
        """How many jobs take a step before ``turn`` does, as things stand (the one holding the turn included)."""
        mine = self._rank(turn)
        before = {other for other in self._candidates() if other is not turn and self._rank(other) < mine}
        before |= {other for other in self._jobs if other.owner is turn.owner and other.arrived < turn.arrived}
        if self._holder is not None and self._holder is not turn:
            before.add(self._holder)
        return len(before)

    def _account(self, turn: Turn) -> None:
        if turn.held_since is not None:
            turn.service += time.perf_counter() - turn.held_since
            turn.held_since = None

    def _step(self, turn: Turn) -> None:
        with self._changed:
            self._account(turn)
            if self._best() is turn:
                turn.held_since, turn.last_turn = time.perf_counter(), next(self._turns_given)
                return
        with turn.set_aside():
            self._leave(turn, away=False)
            self._wait_for_turn(turn)

    def _leave(self, turn: Turn, away: bool) -> None:
        """``turn`` gives the turn up (takes the lock itself)."""
        with self._changed:
            self._account(turn)
            turn.away = away
            if self._holder is turn:
                self._holder = None
            self._changed.notify_all()

    def _wait_for_turn(self, turn: Turn) -> None:
        """Block until ``turn`` holds the turn (takes the lock itself); tell it its place in the line meanwhile."""
        shown_ahead = None
        with self._changed:
            turn.away = False
            while not (self._holder is None and self._best() is turn):
                if not turn.started and turn.cancelled():
                    raise Cancelled("cancelled before it started")
                ahead = self._ahead(turn)
                if ahead != shown_ahead:
                    shown_ahead = ahead
                    self._changed.release()  # the callback may report to the page: not under the lock
                    try:
                        turn.waiting(ahead)
                    finally:
                        self._changed.acquire()
                    continue
                self._changed.wait(POLL_SECONDS)
            self._holder, turn.started, turn.held_since = turn, True, time.perf_counter()
            turn.last_turn = next(self._turns_given)
