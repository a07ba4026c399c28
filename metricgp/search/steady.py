"""Asynchronous evaluation without a generation barrier, reproducible for a fixed seed and lag.

A synchronous search waits, at every stage of every generation, for its slowest evaluation: the
other workers idle. Here a worker that finishes takes the next queued job at once. What makes the
run reproducible although results arrive in any order:

- jobs are numbered as they are created, and results are *integrated* (folded into the search's
  state) strictly in that order; a result that arrives early waits in a buffer;
- a new job is created only right after an integration (or at the start), and at most `lag` jobs
  are created and not yet integrated (bounded staleness): job i is made from the state after
  exactly the integrations that precede it, whatever the timing.

So the sequence of jobs, and every result, depends on the seed and `lag` alone, not on the number
of workers or their speed; `lag` only has to be large enough to keep the workers busy (default
2 x workers: while one job straggles, the others can run up to `lag - 1` later jobs). The search
supplies three plain functions: `make()` (the next job's payload, plain data, or None when none
can be made now), `candidate_of(payload)`, and `integrate(payload, result)`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from metricgp.evaluate import FitnessResult
from metricgp.search.backends import Backend

DISPATCHES = ("sync", "async")
Payload = dict[str, Any]  # what a job is, as plain data ("windows" is the number of windows)


def default_lag(workers: int) -> int:
    return 2 * max(workers, 1)


class BoundedStaleness:
    def __init__(self, backend: Backend, lag: int, make: Callable[[], Payload | None],
                 candidate_of: Callable[[Payload], Any], integrate: Callable[[Payload, FitnessResult], None]):
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        self.backend = backend
        self.lag = lag
        self.make = make
        self.candidate_of = candidate_of
        self.integrate = integrate
        self.created = 0
        self.integrated = 0
        self.pending: dict[int, Payload] = {}  # created, not yet integrated
        self._submitted: set[int] = set()
        self._done: dict[int, FitnessResult] = {}  # finished out of order, waiting for their turn
        self.busy_seconds = 0.0  # evaluation seconds reported by the workers (for the idle share)

    def _fill(self) -> None:
        while self.created - self.integrated < self.lag:
            payload = self.make()
            if payload is None:
                break
            self.pending[self.created] = payload
            self.created += 1
        for ticket in sorted(set(self.pending) - self._submitted):  # in creation order
            payload = self.pending[ticket]
            self.backend.submit(ticket, self.candidate_of(payload), int(payload["windows"]))
            self._submitted.add(ticket)

    def advance(self, until: Callable[[], bool]) -> bool:
        """Integrate results in order until `until()` holds (checked after every integration);
        False if no job can be made or is running while `until()` is still false."""
        self._fill()
        while not until():
            if self.integrated in self._done:
                ticket = self.integrated
                self.integrate(self.pending.pop(ticket), self._done.pop(ticket))
                self._submitted.discard(ticket)
                self.integrated += 1
                self._fill()
                continue
            if not self.pending:
                return False
            for ticket, result in self.backend.collect():
                self._done[ticket] = result
                self.busy_seconds += result.seconds
        return True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Jobs created but not integrated are stored; finished results waiting in the buffer are not
        (a resumed run scores them again, to the same values)."""
        return {"created": self.created, "integrated": self.integrated, "lag": self.lag,
                "pending": [[t, p] for t, p in sorted(self.pending.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.created, self.integrated = int(state["created"]), int(state["integrated"])
        self.pending = {int(t): dict(p) for t, p in state["pending"]}
        self._submitted, self._done = set(), {}


class IdleClock:
    """Worker idle share over a span: 1 - evaluation seconds / (workers x wall seconds)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(workers, 1)
        self.t0 = time.perf_counter()

    def share(self, busy_seconds: float) -> float:
        wall = time.perf_counter() - self.t0
        if wall <= 0:
            return 0.0
        return round(min(max(1.0 - busy_seconds / (self.workers * wall), 0.0), 1.0), 4)


class Rungs:
    """Asynchronous successive halving (ASHA, Li et al. 2018): an item scored at rung k goes up to rung
    k+1 as soon as it ranks among the best `keep(n)` of the n items scored at rung k so far. Items wait
    in `queue` as (item, next rung), in the order they qualified."""

    def __init__(self, n_rungs: int) -> None:
        self.scored: list[list[Any]] = [[] for _ in range(n_rungs)]  # in integration order
        self.promoted: list[set[Any]] = [set() for _ in range(n_rungs)]
        self.queue: deque[tuple[Any, int]] = deque()

    def add(self, item: Any, rung: int, rank_key: Callable[[Any], Any], keep: Callable[[int], int]) -> None:
        self.scored[rung].append(item)
        ranked = sorted(self.scored[rung], key=rank_key)
        for best in ranked[: keep(len(ranked))]:
            if best not in self.promoted[rung]:
                self.promoted[rung].add(best)
                self.queue.append((best, rung + 1))

    def state_dict(self, plain: Callable[[Any], Any] = lambda x: x) -> dict[str, Any]:
        return {"scored": [[plain(x) for x in r] for r in self.scored],
                "promoted": [sorted(plain(x) for x in p) for p in self.promoted],
                "queue": [[plain(x), k] for x, k in self.queue]}

    def load_state_dict(self, state: dict[str, Any], item: Callable[[Any], Any] = lambda x: x) -> None:
        self.scored = [[item(x) for x in r] for r in state["scored"]]
        self.promoted = [{item(x) for x in p} for p in state["promoted"]]
        self.queue = deque((item(x), int(k)) for x, k in state["queue"])
