"""The (1+lambda) level search: one parent, lambda offspring by level switches, staged selection.

One generation:
1. `offspring` distinct children of the parent by level-switch mutation (biased by the metric
   prior when there is one and `bias` is on);
2. with a prior and `screen`, only the `screen` children of lowest predicted loss go on;
3. staged selection (`stages.select`) over them, the parent joining before the last stage; the
   winner is the next parent (the parent stays unless a child is strictly better).

Everything random comes from one `random.Random(seed)`; the state is plain data (`state_dict`), so
a checkpoint resumes exactly. Candidates are scored through a backend (serial or Ray).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metricgp.darwin.fitness import Candidate
from metricgp.darwin.levels import Genome, LevelSpace
from metricgp.darwin.mutation import offspring
from metricgp.darwin.prior import MetricPrior
from metricgp.darwin.stages import Scorer, Stage, select
from metricgp.errors import MetricGPError
from metricgp.ranking import spearman


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
                 prior: MetricPrior | None = None):
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

    def step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        bias = self.prior if self.prior is not None and self.config.bias else None
        children, rejected = offspring(self.parent, self.config.offspring, self.space, self.rng, bias)
        sent = children
        if self.prior is not None and self.config.screen is not None:
            sent = self.prior.screen(children, self.config.screen)
        sel = select(sent, self.parent, self.config.stages, self.score, self.cache)
        accepted = sel.winner != self.parent
        self.parent, self.fitness = sel.winner, sel.fitness
        self.gen += 1
        return self._record(sel, children, rejected, t0, accepted, len(sent))

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
                "rng": self.rng.getstate(), "stages": list(self.config.stages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["stages"]) != tuple(self.config.stages):
            raise MetricGPError("the checkpoint was made with another stage schedule")
        self.gen, self.parent, self.fitness = state["gen"], tuple(state["parent"]), state["fitness"]
        self.cache = dict(state["cache"])
        self.records = [dict(r) for r in state["records"]]
        self.pairs = list(state["pairs"])
        self.elapsed = state["elapsed"]
        self.rng.setstate(state["rng"])
