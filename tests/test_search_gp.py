"""The GP loop on the synthetic evaluator: it improves, it is deterministic, it survives bad
candidates."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest

from metricgp.evaluate import FitnessResult
from metricgp.expr import canonical_key, parse
from metricgp.search.backends import SerialBackend, safe_evaluate
from metricgp.search.gp import GPSearch
from metricgp.search.oos import apply_oos
from metricgp.search.space import load_space, with_overrides
from metricgp.search.staged import NO_LEAVES, FitnessCache, evaluate_cohort
from metricgp.search.synthetic import SyntheticEvaluator, SyntheticSpec, build_synthetic
from metricgp.search.trees import node_to_tree

FIDS = (2, 4, 8)
SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
TIMING = ("seconds", "eval_seconds", "worker_idle_share")


def strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _search(evaluator_factory=None, **gp) -> GPSearch:
    space = with_overrides(load_space(SPACES / "tiny.yaml"), gp=gp)
    factory = evaluator_factory or functools.partial(build_synthetic, SyntheticSpec(fidelities=FIDS))
    return GPSearch(space, SerialBackend(factory), FIDS)


def _run(search: GPSearch, generations: int) -> list[dict]:
    records = [search.initialize()]
    records += [search.step() for _ in range(generations)]
    return records


@pytest.mark.parametrize("algorithm", ["steady_state", "mu_plus_lambda"])
def test_search_improves_on_the_random_initial_population(algorithm):
    search = _search(algorithm=algorithm, seed=4)
    records = _run(search, 10)
    assert records[-1]["best_fitness"] < 0.9 * records[0]["best_fitness"]
    best = search.hof[0]
    assert best.fitness.values[0] == len(FIDS) - 1  # reached the highest fidelity
    magnitude = SyntheticEvaluator(SyntheticSpec(fidelities=FIDS)).evaluate(parse("abs(W)"), 8).fitness
    assert best.fitness.values[1] < 0.5 * magnitude
    # equivalent trees never share the population: every member is its own canonical form,
    # recomputed here from the members' trees
    keys = [canonical_key(ind.node, search.scope) for ind in search.population]
    assert len(search.population) == len(set(keys)) == 12
    assert records[-1]["unique_forms"] == 12 and records[-1]["diversity"] == 1.0


def test_same_seed_same_search_different_seed_different_search():
    a, b, c = _search(seed=1), _search(seed=1), _search(seed=2)
    ra, rb, rc = _run(a, 6), _run(b, 6), _run(c, 6)
    assert strip_timing(ra) == strip_timing(rb)
    assert [str(i.node) for i in a.hof] == [str(i.node) for i in b.hof]
    assert [i.fitness.values for i in a.hof] == [i.fitness.values for i in b.hof]
    assert strip_timing(ra) != strip_timing(rc)


class FlakyEvaluator:
    """Raises for any tree using G, returns inf for trees with sqr, NaN for trees with neg."""

    fidelities = FIDS

    def __init__(self) -> None:
        self.inner = SyntheticEvaluator(SyntheticSpec(fidelities=FIDS))

    def evaluate(self, tree, n_windows):
        text = str(tree)
        if "G" in text:
            raise RuntimeError("boom")
        if "sqr(" in text:
            return FitnessResult(math.inf, n_windows, "constant scores", 0.0, 0.0)
        if "neg(" in text:
            return FitnessResult(math.nan, n_windows, None, 0.0, 0.0)
        return self.inner.evaluate(tree, n_windows)


def test_degenerate_and_failing_candidates_never_crash_the_search(caplog):
    search = _search(FlakyEvaluator, seed=0)
    records = _run(search, 6)
    reasons = {}
    for r in records:
        reasons.update(r["degenerate_reasons"])
    assert any(k.startswith("evaluate raised RuntimeError: boom") for k in reasons)
    assert "constant scores" in reasons and "non-finite fitness" in reasons
    assert sum(r["degenerate"] for r in records) == search.counters["degenerate"] > 0
    assert "evaluate raised RuntimeError" in caplog.text
    for ind in search.hof:
        assert "G" not in str(ind) and "sqr(" not in str(ind) and math.isfinite(ind.fitness.values[1])
    bad = [ind for ind in search.population if ind.fitness.values[0] < 0]
    assert all(ind.fitness.values == (-1, math.inf) for ind in bad)


def test_safe_evaluate_turns_errors_and_nan_into_degenerate_results():
    ev = FlakyEvaluator()
    res = safe_evaluate(ev, parse("G"), 2)
    assert res.fitness == math.inf and res.reason.startswith("evaluate raised RuntimeError: boom")
    assert safe_evaluate(ev, parse("neg(W)"), 2).reason == "non-finite fitness"
    assert safe_evaluate(ev, parse("abs(W)"), 2).reason is None


def test_constant_metrics_are_degenerate_without_asking_the_evaluator():
    search = _search(FlakyEvaluator)
    grammar = search.grammar
    calls = []
    backend = SerialBackend(FlakyEvaluator)
    backend.evaluate = lambda jobs: calls.extend(jobs) or []
    child, _ = apply_oos(node_to_tree(parse("mul(sub(W, W), X)"), grammar), grammar)
    report = evaluate_cohort([child], FIDS, 2, backend, FitnessCache())
    assert calls == [] and report.degenerate == {NO_LEAVES: 1}
    assert child.fitness.values == (-1, math.inf)
    ev = SyntheticEvaluator(SyntheticSpec(fidelities=FIDS))  # and the evaluator agrees
    res = ev.evaluate(parse("sub(W, W)"), 2)
    assert res.fitness == math.inf and "constant" in res.reason


def test_hall_of_fame_keeps_one_of_nearby_constant_tunings():
    from metricgp.expr import parse
    from metricgp.expr.simplify import canonical_key
    from metricgp.search.gp import HallOfFame, near_constants
    from metricgp.search.trees import Individual

    def member(formula: str, fitness: float) -> Individual:
        ind = Individual([])
        ind.node = parse(formula)
        ind.key = canonical_key(ind.node)
        ind.fitness.values = (2, fitness)
        return ind

    tuned = [member(f"abs(W) * (sqrt(X) + {c} * G)", 10 + i) for i, c in enumerate((-0.63, -0.61, -0.58))]
    other = [member("abs(W) * (sqrt(X) + 100.0 * G)", 9.5), member("abs(W) * (sqrt(X) + 0.63 * G)", 9.7),
             member("abs(W) * sqr(X)", 11.0), member("abs(W) * X", 12.0)]
    hof = HallOfFame(10)
    hof.update(tuned[::-1] + other)
    kept = [str(ind.node) for ind in hof]
    assert str(tuned[0].node) in kept and str(tuned[1].node) not in kept and str(tuned[2].node) not in kept
    assert len(hof) == 5  # the best tuning of -0.6*G, +100*G, +0.63*G (another sign), X^2 and X
    assert not near_constants("X**2*abs(W)", "X**3*abs(W)") and near_constants("0.5*X", "0.55*X")
