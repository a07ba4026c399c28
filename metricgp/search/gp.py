"""The GP strategy: DEAP operators, our own loop (steady state or mu+lambda), OOS and staged fitness.

One generation:
1. `offspring` children, each from two parents chosen by tournament (the paper's: sample
   `tournament_size`, keep the best `tournament_keep`, draw two; ties go to the smaller tree; or
   DEAP's selDoubleTournament when `parsimony_size` > 1); subtree crossover with probability cxpb,
   then one mutation drawn from the space's list (always when there was no crossover), both
   bloat-limited with `gp.staticLimit` on height and size.
2. OOS on each child; a child equivalent to one of its parents is regenerated (at most
   `max_regenerate` times).
3. The children are raced through the fidelities as one cohort (`staged.evaluate_cohort`),
   equivalents of evaluated trees answered from the cache.
4. Replacement. steady_state: each child in turn joins the population and the worst member leaves
   (the paper's loop, with children of one generation bred from the same population so they can be
   evaluated in parallel; offspring=1 is exactly the paper's). mu_plus_lambda: the best
   `population` of parents + children survive. Either way a child equivalent to a member is not
   added twice, so equivalent trees stop competing.

Asynchronous dispatch (`dispatch="async"`) has no generation barrier: children are bred one at a
time as workers free up, each from the population as it stands after the results integrated so
far (in job order, `metricgp.search.steady`), and the race is asynchronous successive halving
(ASHA, Li et al. 2018): a candidate goes up a fidelity as soon as it ranks in the best 1/eta of
everything scored at its fidelity so far. A "generation" is then `offspring` children joined to the
population. Results depend on the seed and `lag` alone (never on timing or worker count), but differ
from the synchronous run's.

Everything random goes through the global `random` (DEAP's operators use it), seeded once; the
search's whole state is plain data (`state_dict`), so a checkpoint resumes exactly.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from deap import gp, tools

from metricgp.evaluate import FitnessResult
from metricgp.expr.builtins import resolve_metric
from metricgp.expr.parse import parse
from metricgp.expr.simplify import DEFAULT_SCOPE, resolve_scope
from metricgp.search.backends import Backend
from metricgp.search.breeding import ALGORITHMS, MUTATIONS, rank_key
from metricgp.search.oos import apply_oos
from metricgp.search.space import SearchSpace
from metricgp.search.staged import (
    CohortReport,
    FitnessCache,
    assign_fitness,
    evaluate_cohort,
    record_constant,
    record_result,
)
from metricgp.search.steady import DISPATCHES, BoundedStaleness, IdleClock, Payload, Rungs, default_lag
from metricgp.search.trees import Grammar, Individual, build_grammar, node_to_tree

BREED_TRIES = 50  # async: children bred per job before giving up (all equivalent to scored ones)
COUNTERS = ("evaluations", "windows", "cache_hits", "oos_regenerated", "oos_exhausted", "oos_simplified",
            "oos_nodes_removed", "duplicates_rejected", "degenerate")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


HOF_CONSTANT_TOLERANCE = 0.25  # constants this close (relative) make two forms one entry of the hall of fame
_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def near_constants(a: str, b: str, tolerance: float = HOF_CONSTANT_TOLERANCE) -> bool:
    """Two canonical keys that differ only in their numbers, each pair within `tolerance` of the
    larger (signs are part of the form): `abs(W)*(sqrt(X) - 0.63*G)` and `... - 0.61*G` are one
    idea, `... + 100*G` is another."""
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    pairs = zip(map(float, _NUMBER.findall(a)), map(float, _NUMBER.findall(b)), strict=True)
    return all(abs(x - y) <= tolerance * max(abs(x), abs(y)) for x, y in pairs)


def _same_metric(a: Individual, b: Individual) -> bool:
    if a.key == b.key or tuple(a.fitness.values) == tuple(b.fitness.values):
        return True
    return a.key is not None and b.key is not None and near_constants(a.key, b.key)


class HallOfFame(tools.HallOfFame):
    """DEAP's hall of fame of distinct metrics. Two individuals are the same metric if their
    canonical keys are equal, if they reached the same stage with exactly the same fitness (then
    they almost surely prune the same weights, e.g. G and sqrt(G)), or if their keys differ only by
    nearby constants (`near_constants`: ten tunings of one constant are one entry, the best). A
    similar newcomer replaces a member only if it ranks better (a higher stage, or the same fitness
    with a smaller tree)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize, similar=_same_metric)

    def update(self, population: Sequence[Individual]) -> None:
        for ind in population:
            if ind.fitness.values[0] < 0:  # degenerate
                continue
            same = [i for i, h in enumerate(self) if self.similar(ind, h)]
            if same:
                if rank_key(ind) < rank_key(self[same[0]]):
                    self.remove(same[0])
                    self.insert(ind)
            elif len(self) < self.maxsize:
                self.insert(ind)
            elif ind.fitness > self[-1].fitness:
                self.remove(-1)
                self.insert(ind)

    def refresh(self, cache: FitnessCache, fidelities: Sequence[int]) -> None:
        members = list(self)
        self.clear()
        for ind in members:
            assign_fitness(ind, cache, fidelities)
            self.update([ind])


class GPSearch:
    """A metric search over one space, evaluating through `backend` at `fidelities`.

    `scope` is the simplification scope (`metricgp.expr.simplify.SCOPES`) of OOS and of the
    canonical keys that the fitness cache, the regeneration of children and the duplicate checks
    use: two trees with one key must get the same fitness from the evaluator. Default: the
    evaluator's `scope` attribute (via `backend.scope()`), "tensor" for the unstructured and N:M
    evaluators."""

    def __init__(self, space: SearchSpace, backend: Backend, fidelities: Sequence[int],
                 scope: str | None = None, references: Sequence[str] = (), dispatch: str = "sync",
                 lag: int | None = None) -> None:
        fids = tuple(sorted(set(int(f) for f in fidelities)))
        if not fids or fids[0] < 1:
            raise ValueError(f"fidelities must be positive window counts, got {fidelities}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.dispatch = dispatch
        self.lag = lag if lag is not None else default_lag(getattr(backend, "workers", 1))
        self._engine: BoundedStaleness | None = None  # built on the first asynchronous generation
        self.space = space
        self.params = space.gp
        self.backend = backend
        self.fidelities = fids
        self.scope = resolve_scope(scope if scope is not None else backend.scope())
        self.grammar: Grammar = build_grammar(space)
        self.cache = FitnessCache()
        # Metrics scored on the search's own windows at every fidelity, outside the population, so
        # each generation's best can be read against them (a from-scratch run vs wanda, gblm).
        self.reference_names = tuple(references)
        self.references: dict[str, dict[int, float]] = {}
        self.population: list[Individual] = []
        self.hof = HallOfFame(self.params.hof_size)
        self.records: list[dict[str, Any]] = []  # one per generation, as written to log.jsonl
        self.logbook = tools.Logbook()  # DEAP's view of the scalar columns, for printing
        self.size_stats = tools.Statistics(key=len)
        for name, fn in (("avg", np.mean), ("min", np.min), ("max", np.max)):
            self.size_stats.register(name, fn)
        self.counters: Counter = Counter({k: 0 for k in COUNTERS})
        self.gen = -1  # the last completed generation; 0 is the initial population
        self.elapsed = 0.0
        lim = space.limits
        limit = [gp.staticLimit(operator.attrgetter("height"), lim.max_depth - 1),
                 gp.staticLimit(len, lim.max_size)]
        self._crossover = functools.reduce(lambda f, d: d(f), limit, gp.cxOnePoint)
        self._mutations = [functools.reduce(lambda f, d: d(f), limit, MUTATIONS[name](self.grammar.pset))
                           for name in self.params.mutations]

    # ------------------------------------------------------------------ operators

    def _oos(self, ind: Individual) -> Individual:
        out, removed = apply_oos(ind, self.grammar, self.scope)
        self.counters["oos_simplified"] += removed > 0
        self.counters["oos_nodes_removed"] += removed
        return out

    def select_parents(self) -> tuple[Individual, Individual]:
        p = self.params
        if p.parsimony_size > 1.0:
            a, b = tools.selDoubleTournament(self.population, 2, fitness_size=p.tournament_size,
                                             parsimony_size=p.parsimony_size, fitness_first=True)
            return a, b
        sample = random.sample(self.population, min(p.tournament_size, len(self.population)))
        top = sorted(sample, key=rank_key)[: max(p.tournament_keep, 2)]
        a, b = random.sample(top, 2) if len(top) >= 2 else (top[0], top[0])
        return a, b

    def make_child(self, p1: Individual, p2: Individual) -> Individual:
        """Crossover and/or mutation, then OOS; regenerated while equivalent to a parent."""
        child = p1
        for _ in range(self.params.max_regenerate + 1):
            c1, c2 = copy.deepcopy(p1), copy.deepcopy(p2)
            crossed = random.random() < self.params.cxpb
            if crossed:
                c1, c2 = self._crossover(c1, c2)
            if not crossed or random.random() < self.params.mutpb:
                (c1,) = random.choice(self._mutations)(c1)
            child = self._oos(c1)
            if child.key not in (p1.key, p2.key):
                return child
            self.counters["oos_regenerated"] += 1
        self.counters["oos_exhausted"] += 1
        return child

    # ---------------------------------------------------------------- generations

    def _evaluate(self, cohort: Sequence[Individual]) -> dict[str, Any]:
        clock = IdleClock(getattr(self.backend, "workers", 1))
        rep = evaluate_cohort(cohort, self.fidelities, self.space.fidelity.eta, self.backend, self.cache)
        return self._count(rep, clock.share(rep.seconds))

    def _count(self, rep: CohortReport, idle_share: float) -> dict[str, Any]:
        for ind in self.population:  # an equivalent may have been promoted: re-read the cache
            assign_fitness(ind, self.cache, self.fidelities)
        self.counters["evaluations"] += sum(rep.evaluations.values())
        self.counters["windows"] += sum(n * c for n, c in rep.evaluations.items())
        self.counters["cache_hits"] += rep.cache_hits
        self.counters["degenerate"] += sum(rep.degenerate.values())
        return {"evaluations": {str(n): rep.evaluations.get(n, 0) for n in self.fidelities},
                "degenerate_reasons": dict(rep.degenerate), "eval_seconds": round(rep.seconds, 3),
                "worker_idle_share": idle_share, "windows_run": rep.windows_run}

    def _evaluate_references(self) -> None:
        """Every reference metric at every fidelity (not counted as search evaluations)."""
        jobs = [(name, n) for name in self.reference_names for n in self.fidelities]
        results = self.backend.evaluate([(resolve_metric(name), n) for name, n in jobs])
        for (name, n), res in zip(jobs, results, strict=True):
            self.references.setdefault(name, {})[n] = res.fitness

    def initialize(self) -> dict[str, Any]:
        """Seed, draw a ramped half-and-half population of distinct canonical forms, evaluate it."""
        seed_everything(self.params.seed)
        t0 = time.perf_counter()
        lim = self.space.limits
        seen: set[str] = set()
        pop: list[Individual] = []
        for formula in self.space.seed_metrics[: self.params.population]:
            ind = self._oos(node_to_tree(resolve_metric(formula), self.grammar))
            if ind.key not in seen:
                seen.add(ind.key)
                pop.append(ind)
        for _ in range(50 * self.params.population):
            if len(pop) == self.params.population:
                break
            heights = (lim.init_min_depth - 1, lim.init_max_depth - 1)
            raw = Individual(gp.genHalfAndHalf(self.grammar.pset, *heights))
            ind = self._oos(raw)
            if ind.key in seen or not ind.node.leaves_used():
                continue
            seen.add(ind.key)
            pop.append(ind)
        while len(pop) < self.params.population:  # a tiny space has few distinct forms: allow repeats
            pop.append(copy.deepcopy(pop[len(pop) % max(len(seen), 1)]))
        self.population = pop
        self._evaluate_references()
        before = Counter(self.counters)
        extra = self._evaluate(pop)
        self.hof.update(pop)
        self.gen = 0
        return self._record(before, extra, time.perf_counter() - t0)

    def step(self) -> dict[str, Any]:
        """One generation; returns its log record."""
        if self.dispatch == "async":
            return self._step_async()
        t0 = time.perf_counter()
        before = Counter(self.counters)
        children = [self.make_child(*self.select_parents()) for _ in range(self.params.offspring)]
        extra = self._evaluate(children)
        replace = ALGORITHMS[self.params.algorithm]
        self.population, rejected = replace(self.population, children, self.params.population)
        self.counters["duplicates_rejected"] += rejected
        self.hof.refresh(self.cache, self.fidelities)
        self.hof.update(children)
        self.gen += 1
        return self._record(before, extra, time.perf_counter() - t0)

    # ------------------------------------------------------- asynchronous generations

    def _async_engine(self) -> BoundedStaleness:
        if self._engine is None:
            self._engine = BoundedStaleness(self.backend, self.lag, self._make_job, self._candidate_of,
                                            self._integrate)
            self._rungs = Rungs(len(self.fidelities))  # finite results per fidelity, and who goes up
            self._waiting: dict[str, Individual] = {}  # new children whose first result is not in
            self._formulas: dict[str, str] = {ind.key: str(ind.node) for ind in self.population}
            self._nodes: dict[str, Any] = {}
            for key in sorted(self.cache.results):  # what the synchronous initial race scored
                for rung, n in enumerate(self.fidelities):
                    got = self.cache.get(key, n)
                    if got is not None and math.isfinite(got[0]):
                        self._rungs.scored[rung].append(key)
                        if rung > 0:
                            self._rungs.promoted[rung - 1].add(key)
            self._joined = 0
            self._report = CohortReport()
        return self._engine

    def _join(self, child: Individual) -> None:
        assign_fitness(child, self.cache, self.fidelities)
        replace = ALGORITHMS[self.params.algorithm]
        self.population, rejected = replace(self.population, [child], self.params.population)
        self.counters["duplicates_rejected"] += rejected
        self.hof.update([child])
        self._joined += 1

    def _make_job(self) -> Payload | None:
        """A promotion waiting to run, else the next new child (equivalents of scored forms join at once)."""
        while self._rungs.queue:
            key, rung = self._rungs.queue.popleft()
            if self.cache.get(key, self.fidelities[rung]) is None:
                return {"key": key, "formula": self._formulas[key], "rung": rung, "windows": self.fidelities[rung]}
        first = self.fidelities[0]
        for _ in range(BREED_TRIES):
            child = self.make_child(*self.select_parents())
            self.cache.remember(child)
            if child.key in self._waiting:
                self._report.cache_hits += 1
                continue
            if self.cache.get(child.key, first) is not None:
                self._report.cache_hits += 1
                self._join(child)
                continue
            if not child.node.leaves_used():
                record_constant(self.cache, child.key, first, self._report)
                self._join(child)
                continue
            self._waiting[child.key] = child
            self._formulas[child.key], self._nodes[child.key] = str(child.node), child.node
            return {"key": child.key, "formula": str(child.node), "rung": 0, "windows": first}
        return None

    def _candidate_of(self, payload: Payload) -> Any:
        key = payload["key"]
        if key not in self._nodes:  # after a resume
            self._nodes[key] = parse(payload["formula"])
        return self._nodes[key]

    def _integrate(self, payload: Payload, result: FitnessResult) -> None:
        key, rung, n = payload["key"], int(payload["rung"]), int(payload["windows"])
        record_result(self.cache, key, n, result, self._report)
        self._report.evaluations[n] = self._report.evaluations.get(n, 0) + 1
        if key in self._waiting and rung == 0:
            self._join(self._waiting.pop(key))
        for ind in self.population:
            if ind.key == key:
                assign_fitness(ind, self.cache, self.fidelities)
        if not math.isfinite(self.cache.get(key, n)[0]) or rung + 1 == len(self.fidelities):
            return
        self._rungs.add(key, rung, lambda k: (self.cache.get(k, n)[0], self.cache.forms[k][1], k),
                        lambda scored: scored // self.space.fidelity.eta)

    def _step_async(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        engine = self._async_engine()
        before = Counter(self.counters)
        self._joined, self._report = 0, CohortReport()
        busy0, clock = engine.busy_seconds, IdleClock(getattr(self.backend, "workers", 1))
        if not engine.advance(lambda: self._joined >= self.params.offspring):
            raise RuntimeError("no new child could be bred: every one is equivalent to a scored form")
        self._report.seconds = engine.busy_seconds - busy0
        extra = self._count(self._report, clock.share(self._report.seconds))
        self.hof.refresh(self.cache, self.fidelities)
        self.gen += 1
        return self._record(before, extra, time.perf_counter() - t0)

    def _async_state(self) -> dict[str, Any] | None:
        if self._engine is None:
            return None
        return {"engine": self._engine.state_dict(), "rungs": self._rungs.state_dict(),
                "formulas": dict(self._formulas),
                "waiting": [(str(ind.node), key) for key, ind in self._waiting.items()]}

    def _load_async_state(self, state: dict[str, Any] | None) -> None:
        self._engine = None
        if state is None:
            return
        engine = self._async_engine()
        engine.load_state_dict(state["engine"])
        self._rungs.load_state_dict(state["rungs"])
        self._formulas = dict(state["formulas"])
        self._waiting = {}
        for formula, key in state["waiting"]:
            ind = node_to_tree(parse(formula), self.grammar)
            ind.key = key
            self._waiting[key] = ind
            self._nodes[key] = ind.node

    # -------------------------------------------------------------------- logging

    def _record(self, before: Counter, extra: dict[str, Any], seconds: float) -> dict[str, Any]:
        self.elapsed += seconds
        pop = self.population
        top = len(self.fidelities) - 1
        at_top = [ind.fitness.values[1] for ind in pop if ind.fitness.values[0] == top]
        first = [self.cache.get(ind.key, self.fidelities[0])[0] for ind in pop]
        first = [v for v in first if math.isfinite(v)]
        size = self.size_stats.compile(pop)
        keys = {ind.key for ind in pop}
        best = self.hof[0] if len(self.hof) else None
        delta = {k: self.counters[k] - before[k] for k in COUNTERS}
        rec = {
            "gen": self.gen,
            "best_fitness": best.fitness.values[1] if best is not None else None,
            "best_fidelity": self.fidelities[int(best.fitness.values[0])] if best is not None else None,
            "best_formula": str(best.node) if best is not None else None,
            "median_fitness": statistics.median(at_top) if at_top else None,
            "median_fitness_f0": statistics.median(first) if first else None,
            "n_at_top_fidelity": len(at_top),
            "diversity": len(keys) / len(pop),
            "unique_forms": len(keys),
            "size_mean": float(size["avg"]),
            "size_min": int(size["min"]),
            "size_max": int(size["max"]),
            "evaluations_per_fidelity": extra["evaluations"],
            "cache_hits": delta["cache_hits"],
            "oos_regenerated": delta["oos_regenerated"],
            "oos_saves": delta["cache_hits"] + delta["oos_regenerated"],
            "oos_simplified": delta["oos_simplified"],
            "duplicates_rejected": delta["duplicates_rejected"],
            "degenerate": delta["degenerate"],
            "degenerate_reasons": extra["degenerate_reasons"],
            "windows": delta["windows"],
            "eval_seconds": extra["eval_seconds"],
            "worker_idle_share": extra.get("worker_idle_share"),
            "windows_run": extra.get("windows_run"),
            "dispatch": self.dispatch,
            "seconds": round(seconds, 3),
        }
        if self.references and best is not None:  # on the windows the best was scored on
            rec["references"] = {name: per[rec["best_fidelity"]] for name, per in self.references.items()}
        self.records.append(rec)
        self.logbook.record(**{k: v for k, v in rec.items() if not isinstance(v, dict)})
        return rec

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: plain data (no DEAP objects)."""
        return {
            "gen": self.gen,
            "fidelities": self.fidelities,
            "scope": self.scope,
            "population": [(str(ind.node), ind.key) for ind in self.population],
            "hof": [(str(ind.node), ind.key) for ind in self.hof],
            "records": [dict(r) for r in self.records],
            "cache": {"results": self.cache.results, "forms": self.cache.forms},
            "counters": dict(self.counters),
            "elapsed": self.elapsed,
            "references": {name: dict(per) for name, per in self.references.items()},
            "rng": rng_state(),
            "async": self._async_state(),
        }

    def _revive(self, item: tuple[str, str]) -> Individual:
        formula, key = item
        ind = node_to_tree(parse(formula), self.grammar)
        ind.key = key
        assign_fitness(ind, self.cache, self.fidelities)
        return ind

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["fidelities"]) != self.fidelities:
            raise ValueError(f"checkpoint fidelities {state['fidelities']} differ from {self.fidelities}")
        scope = state.get("scope", DEFAULT_SCOPE)  # checkpoints before scopes were "tensor"
        if scope != self.scope:
            raise ValueError(f"checkpoint keys were made in simplification scope {scope!r}, "
                             f"the evaluator's is {self.scope!r}")
        self.cache = FitnessCache(state["cache"]["results"], state["cache"]["forms"])
        self.gen = state["gen"]
        self.population = [self._revive(item) for item in state["population"]]
        self.hof = HallOfFame(self.params.hof_size)
        self.hof.update([self._revive(item) for item in state["hof"]])
        self.records = []
        self.logbook = tools.Logbook()
        for rec in state["records"]:
            self.records.append(rec)
            self.logbook.record(**{k: v for k, v in rec.items() if not isinstance(v, dict)})
        self.counters = Counter(state["counters"])
        self.elapsed = state["elapsed"]
        self.references = {name: {int(n): v for n, v in per.items()}
                           for name, per in state.get("references", {}).items()}
        set_rng_state(state["rng"])
        self._load_async_state(state.get("async"))
