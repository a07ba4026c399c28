"""Multi-fidelity evaluation of a cohort of new candidates, and the fitness cache.

Fidelities f_0 < f_1 < ... < f_K are numbers of validation windows. Each generation's cohort of
new children is raced by successive halving (as EvoPress's staged selection):

1. every distinct candidate (by canonical key) not seen before is evaluated on f_0 windows;
2. at each next stage, the best ceil(n / eta) of the candidates that have a finite value at the
   previous stage (n of them) are evaluated on f_{k+1} windows (ties: smaller tree, then key).

**Comparison basis.** An individual's fitness is the pair (stage reached, value at that stage),
compared lexicographically: a candidate that reached a higher stage beats every candidate that
stopped below it, and two candidates at the same stage are compared on exactly the same windows.
So selection never compares a 2-window perplexity with a 32-window one. A candidate not promoted
in its generation therefore ranks behind every promoted one and is the first to be replaced.
Degenerate candidates (inf at any stage: constant or non-finite scores, an evaluator exception)
get stage -1 and value inf, behind everything.

A candidate's race is run once, in the generation that first produced its canonical form; an
equivalent produced later is answered from the cache at whatever stage the form reached, at no
cost (it does not race again).

The cache maps (canonical key, windows) -> result and is the one source of truth for fitness:
an individual's fitness is always read from it, so an equivalent tree evaluated (or promoted)
later is seen by every individual with the same key.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from metricgp.evaluate import FitnessResult
from metricgp.expr.printing import to_functional
from metricgp.search.backends import Backend
from metricgp.search.trees import Individual

log = logging.getLogger(__name__)

NO_LEAVES = "constant metric (uses no leaf)"


@dataclass
class FitnessCache:
    """(key, windows) -> (fitness, reason); key -> (functional form, size) of its first tree."""

    results: dict[str, dict[int, tuple[float, str | None]]] = field(default_factory=dict)
    forms: dict[str, tuple[str, int]] = field(default_factory=dict)

    def get(self, key: str, windows: int) -> tuple[float, str | None] | None:
        return self.results.get(key, {}).get(windows)

    def put(self, key: str, windows: int, fitness: float, reason: str | None) -> None:
        self.results.setdefault(key, {})[windows] = (fitness, reason)

    def remember(self, ind: Individual) -> None:
        if ind.key not in self.forms:
            self.forms[ind.key] = (to_functional(ind.node), len(ind))

    def fitness(self, key: str, fidelities: Sequence[int]) -> tuple[tuple[int, float], str | None]:
        """(stage, value) of a key: its highest evaluated stage, or (-1, inf) if degenerate there."""
        got = self.results.get(key, {})
        for stage in range(len(fidelities) - 1, -1, -1):
            if fidelities[stage] in got:
                value, reason = got[fidelities[stage]]
                if not math.isfinite(value):
                    return (-1, math.inf), reason or "non-finite fitness"
                return (stage, value), None
        raise KeyError(f"no cached fitness for {key!r}")


@dataclass
class CohortReport:
    """What one call of `evaluate_cohort` cost and saved."""

    evaluations: dict[int, int] = field(default_factory=dict)  # windows -> evaluator calls
    cache_hits: int = 0  # candidates answered without evaluation at f_0 (cache or in-cohort duplicate)
    degenerate: Counter = field(default_factory=Counter)  # reason -> count (distinct candidates)
    seconds: float = 0.0
    windows_run: int = 0  # windows the evaluators actually ran (those that report it)


def assign_fitness(ind: Individual, cache: FitnessCache, fidelities: Sequence[int]) -> None:
    ind.fitness.values, _ = cache.fitness(ind.key, fidelities)


def record_result(cache: FitnessCache, key: str, n: int, res: FitnessResult, report: CohortReport) -> None:
    fitness = res.fitness if math.isfinite(res.fitness) else math.inf
    reason = res.reason if fitness == math.inf else None
    if fitness == math.inf:
        reason = reason or "non-finite fitness"
        report.degenerate[reason[:120]] += 1
        if reason.startswith("evaluate raised"):
            log.warning("candidate %s: %s", cache.forms[key][0], reason)
    cache.put(key, n, fitness, reason)
    report.seconds += res.seconds
    report.windows_run += res.windows_run or 0


def record_constant(cache: FitnessCache, key: str, n: int, report: CohortReport) -> None:
    """A metric that reads no leaf scores every weight alike: degenerate, without asking the evaluator."""
    record_result(cache, key, n, FitnessResult(math.inf, n, NO_LEAVES, 0.0, 0.0), report)


def evaluate_cohort(cohort: Sequence[Individual], fidelities: Sequence[int], eta: int,
                    backend: Backend, cache: FitnessCache) -> CohortReport:
    """Race the cohort through the fidelities (see the module doc); set every member's fitness."""
    report = CohortReport()
    first: dict[str, Individual] = {}  # the new distinct candidates of this cohort
    for ind in cohort:
        cache.remember(ind)
        if ind.key in first or cache.get(ind.key, fidelities[0]) is not None:
            report.cache_hits += 1
        else:
            first[ind.key] = ind
    candidates = list(first)
    for stage, n in enumerate(fidelities):
        if stage > 0:
            prev = fidelities[stage - 1]
            alive = [k for k in candidates if math.isfinite(cache.get(k, prev)[0])]
            alive.sort(key=lambda k: (cache.get(k, prev)[0], cache.forms[k][1], k))
            candidates = alive[: math.ceil(len(alive) / eta)]
        todo = [k for k in candidates if cache.get(k, n) is None]
        jobs = []
        for k in todo:
            if not first[k].node.leaves_used():  # no need to ask the evaluator
                record_constant(cache, k, n, report)
            else:
                jobs.append(k)
        for k, res in zip(jobs, backend.evaluate([(first[k].node, n) for k in jobs]), strict=True):
            record_result(cache, k, n, res, report)
        if jobs:
            report.evaluations[n] = report.evaluations.get(n, 0) + len(jobs)
    for ind in cohort:
        assign_fitness(ind, cache, fidelities)
    return report
