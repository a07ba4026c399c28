"""The (1+lambda) level search: one parent, lambda offspring by level switches, staged selection.

One generation:
1. `offspring` distinct children of the parent by level-switch mutation (biased by the metric
   prior when there is one and `bias` is on);
2. with a prior and `screen`, only the `screen` children of lowest predicted loss go on;
3. staged selection (`stages.select`) over them, the parent joining before the last stage; the
   winner is the next parent (the parent stays unless a child is strictly better).

Asynchronous dispatch (`dispatch="async"`, `metricgp.search.steady`) drops the barrier at every stage
of every generation: each generation's children are bred from the parent as it stands when the
previous batch is used up, and the stages become asynchronous successive halving (ASHA): a child goes
to stage k+1 as soon as it ranks among the best survivors[k]/n_k of every candidate scored at stage k
so far (n_0 = children sent, n_k = survivors[k-1]); one that reaches the last stage replaces the
parent if strictly better there. A "generation" is `offspring` children scored at the first stage.
Results depend on the seed and `lag` alone, not on timing or worker count, but differ from sync's.

Everything random comes from one `random.Random(seed)`; the state is plain data (`state_dict`), so
a checkpoint resumes exactly. Candidates are scored through a backend (serial or Ray).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metricgp.darwin.fitness import Candidate
from metricgp.darwin.levels import Genome, LevelSpace
from metricgp.darwin.mutation import offspring
from metricgp.darwin.prior import MetricPrior
from metricgp.darwin.stages import Scorer, Selection, Stage, select
from metricgp.errors import MetricGPError
from metricgp.evaluate import FitnessResult
from metricgp.ranking import spearman
from metricgp.search.backends import Backend
from metricgp.search.steady import DISPATCHES, BoundedStaleness, IdleClock, Payload, Rungs, default_lag


@dataclass(frozen=True)
class SearchConfig:
    stages: tuple[Stage, ...]
    offspring: int = 16
    generations: int = 50
    seed: int = 0
    screen: int | None = None  # with a prior: children sent to the first stage (None: all)
    bias: bool = True  # with a prior: bias which genes a mutation moves

    def validate(self) -> SearchConfig:
        if self.offspring < 1 or self.generations < 0:
            raise MetricGPError(f"--offspring must be >= 1 and --generations >= 0, got {self.offspring}, "
                                f"{self.generations}")
        if self.screen is not None and not 1 <= self.screen:
            raise MetricGPError(f"--screen must be >= 1, got {self.screen}")
        return self


def backend_scorer(backend, stages: Sequence[Stage]) -> Scorer:
    """Score genomes at a stage through a backend (`evaluate([(candidate, windows)])`)."""

    def score(genomes: list[Genome], k: int) -> list[float]:
        jobs = [(Candidate(g, stages[k].train_tokens), stages[k].windows) for g in genomes]
        return [r.fitness for r in backend.evaluate(jobs)]

    return score


class LevelSearch:
    def __init__(self, space: LevelSpace, config: SearchConfig, score: Scorer, start: Genome,
                 prior: MetricPrior | None = None, backend: Backend | None = None, dispatch: str = "sync",
                 lag: int | None = None):
        if dispatch not in DISPATCHES or (dispatch == "async" and backend is None):
            raise ValueError(f"dispatch must be one of {DISPATCHES} (async needs a backend), got {dispatch!r}")
        self.dispatch = dispatch
        self.backend = backend
        self.lag = lag if lag is not None else default_lag(getattr(backend, "workers", 1))
        self._engine: BoundedStaleness | None = None
        self.space = space
        self.config = config.validate()
        self.score = score
        self.prior = prior
        self.rng = random.Random(config.seed)
        self.parent: Genome = space.check(start)
        self.fitness = float("inf")
        self.cache: dict[tuple[Genome, int], float] = {}
        self.records: list[dict[str, Any]] = []
        self.pairs: list[tuple[float, float]] = []  # (predicted, measured at the first stage), all gens
        self.gen = -1
        self.elapsed = 0.0

    def initialize(self) -> dict[str, Any]:
        """Score the start genome at the last stage: generation 0."""
        t0 = time.perf_counter()
        sel = select([], self.parent, self.config.stages, self.score, self.cache)
        self.fitness = sel.fitness
        self.gen = 0
        return self._record(sel, [], 0, t0)

    def _breed(self) -> tuple[list[Genome], list[Genome], int]:
        """A generation's children of the current parent, those sent to the first stage, duplicates rejected."""
        bias = self.prior if self.prior is not None and self.config.bias else None
        children, rejected = offspring(self.parent, self.config.offspring, self.space, self.rng, bias)
        sent = children
        if self.prior is not None and self.config.screen is not None:
            sent = self.prior.screen(children, self.config.screen)
        return children, sent, rejected

    def step(self) -> dict[str, Any]:
        if self.dispatch == "async":
            return self._step_async()
        t0 = time.perf_counter()
        children, sent, rejected = self._breed()
        sel = select(sent, self.parent, self.config.stages, self.score, self.cache)
        accepted = sel.winner != self.parent
        self.parent, self.fitness = sel.winner, sel.fitness
        self.gen += 1
        return self._record(sel, children, rejected, t0, accepted, len(sent))

    # ------------------------------------------------------- asynchronous generations

    def _async_engine(self) -> BoundedStaleness:
        if self._engine is None:
            stages = self.config.stages
            self._engine = BoundedStaleness(self.backend, self.lag, self._make_job, self._candidate_of,
                                            self._integrate)
            self._batch: deque[Genome] = deque()  # bred, not yet sent to the first stage
            self._rungs = Rungs(len(stages))
            self._sent = 0  # children sent to the first stage per generation (screening may send fewer)
        return self._engine

    def _keep_fraction(self, k: int) -> float:
        stages = self.config.stages
        before = self._sent if k == 0 else stages[k - 1].survivors
        return stages[k].survivors / max(before, 1)

    def _make_job(self) -> Payload | None:
        while self._rungs.queue:
            genome, k = self._rungs.queue.popleft()
            if (genome, k) not in self.cache:
                return {"genome": list(genome), "stage": k, "windows": self.config.stages[k].windows}
        while not self._batch:
            children, sent, rejected = self._breed()
            self._gen_rejected += rejected
            self._batch.extend(g for g in sent if (g, 0) not in self.cache)
            self._sent = max(len(sent), 1)
            if not children:
                return None
        genome = self._batch.popleft()
        return {"genome": list(genome), "stage": 0, "windows": self.config.stages[0].windows}

    def _candidate_of(self, payload: Payload) -> Candidate:
        return Candidate(tuple(payload["genome"]), self.config.stages[payload["stage"]].train_tokens)

    def _integrate(self, payload: Payload, result: FitnessResult) -> None:
        genome, k = tuple(payload["genome"]), int(payload["stage"])
        value = result.fitness if math.isfinite(result.fitness) else math.inf
        self.cache[(genome, k)] = value
        self._evaluations[k] += 1
        last = len(self.config.stages) - 1
        if k == 0:
            self._first.append((genome, value))
        if k == last:
            if value < self.fitness:  # strictly better than the parent on the same windows
                self.parent, self.fitness, self._accepted = genome, value, True
            return
        if not math.isfinite(value):
            return
        self._rungs.add(genome, k, lambda g: (self.cache[(g, k)], g),
                        lambda scored: math.floor(scored * self._keep_fraction(k)))

    def _step_async(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        engine = self._async_engine()
        self._first, self._evaluations, self._accepted = [], [0] * len(self.config.stages), False
        self._gen_rejected = 0
        busy0, clock = engine.busy_seconds, IdleClock(getattr(self.backend, "workers", 1))
        if not engine.advance(lambda: len(self._first) >= self._sent_per_generation()):
            raise MetricGPError("no new child could be bred from the parent")
        sel = Selection(self.parent, self.fitness, [self._first], list(self._evaluations))
        self.gen += 1
        rec = self._record(sel, [g for g, _ in self._first], self._gen_rejected, t0, self._accepted,
                           len(self._first))
        rec["worker_idle_share"] = clock.share(engine.busy_seconds - busy0)
        return rec

    def _sent_per_generation(self) -> int:
        screen = self.config.screen if self.prior is not None else None
        return min(self.config.offspring, screen or self.config.offspring)

    def _async_state(self) -> dict[str, Any] | None:
        if self._engine is None:
            return None
        return {"engine": self._engine.state_dict(), "batch": [list(g) for g in self._batch],
                "rungs": self._rungs.state_dict(list), "sent": self._sent}

    def _load_async_state(self, state: dict[str, Any] | None) -> None:
        self._engine = None
        if state is None:
            return
        self._async_engine().load_state_dict(state["engine"])
        self._batch = deque(tuple(g) for g in state["batch"])
        self._rungs.load_state_dict(state["rungs"], tuple)
        self._sent = int(state["sent"])

    def _record(self, sel, children: list[Genome], rejected: int, t0: float, accepted: bool = False,
                sent: int = 0) -> dict[str, Any]:
        mine = set(children)
        first = [(g, v) for g, v in (sel.evaluated[0] if sel.evaluated else []) if g in mine]
        rho = None
        if self.prior is not None and first:
            pairs = [(self.prior.predicted(g), v) for g, v in first]
            self.pairs.extend(pairs)
            rho = spearman([p for p, _ in pairs], [m for _, m in pairs])
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        values = [v for _, v in first]
        rec = {
            "gen": self.gen,
            "fitness": self.fitness,
            "kept": self.space.kept_fraction(self.parent),
            "accepted": accepted,
            "offspring": len(children),
            "duplicates_rejected": rejected,
            "sent_to_first_stage": sent,
            "evaluations_per_stage": list(sel.new_evaluations),
            "first_stage_best": min(values) if values else None,
            "first_stage_median": statistics.median(values) if values else None,
            "predicted": self.prior.predicted(self.parent) if self.prior is not None else None,
            "spearman_predicted_vs_first_stage": rho,
            "genome": list(self.parent),
            "seconds": round(seconds, 3),
        }
        self.records.append(rec)
        return rec

    def spearman_all(self) -> float | None:
        return spearman([p for p, _ in self.pairs], [m for _, m in self.pairs]) if self.pairs else None

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen, "parent": self.parent, "fitness": self.fitness, "cache": dict(self.cache),
                "records": [dict(r) for r in self.records], "pairs": list(self.pairs), "elapsed": self.elapsed,
                "rng": self.rng.getstate(), "stages": list(self.config.stages), "async": self._async_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["stages"]) != tuple(self.config.stages):
            raise MetricGPError("the checkpoint was made with another stage schedule")
        self.gen, self.parent, self.fitness = state["gen"], tuple(state["parent"]), state["fitness"]
        self.cache = dict(state["cache"])
        self.records = [dict(r) for r in state["records"]]
        self.pairs = list(state["pairs"])
        self.elapsed = state["elapsed"]
        self.rng.setstate(state["rng"])
        self._load_async_state(state.get("async"))
