"""OOS in the search: children are simplified, a child equivalent to a parent is regenerated, an
equivalent of an evaluated tree is answered from the cache; and the staged (multi-fidelity) race."""

from __future__ import annotations

import math
import random

from metricgp.evaluate import FitnessResult
from metricgp.expr import parse
from metricgp.search.backends import SerialBackend
from metricgp.search.gp import GPSearch
from metricgp.search.oos import apply_oos
from metricgp.search.space import space_from_dict
from metricgp.search.staged import FitnessCache, evaluate_cohort
from metricgp.search.trees import build_grammar, node_to_tree

FIDS = (1, 2, 4)


class CountingEvaluator:
    """Fitness = size of the simplified tree + 1/windows; records every call."""

    fidelities = FIDS

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def evaluate(self, tree, n_windows):
        self.calls.append((str(tree), n_windows))
        return FitnessResult(tree.size() + 1.0 / n_windows, n_windows, None, 0.0, 0.5)


def _space(**gp):
    return space_from_dict({"leaves": ["W", "X", "G"],
                            "operators": ["neg", "abs", "sqrt", "sqr", "add", "mul"],
                            "gp": {"population": 4, "offspring": 4, **gp},
                            "fidelity": {"windows": list(FIDS)}})


def _ind(text, grammar):
    ind, _ = apply_oos(node_to_tree(parse(text), grammar), grammar)
    return ind


def test_apply_oos_simplifies_and_keys():
    grammar = build_grammar(_space())
    ind, removed = apply_oos(node_to_tree(parse("neg(neg(mul(W, sqrt(sqr(X)))))"), grammar), grammar)
    assert str(ind) == "mul(W, X)" and removed == 4  # X >= 0, so abs(X) -> X
    assert ind.key == _ind("mul(X, W)", grammar).key  # commutativity is seen by the key
    assert not ind.fitness.valid


def test_equivalents_are_evaluated_once_and_then_answered_from_the_cache():
    grammar = build_grammar(_space())
    ev = CountingEvaluator()
    cache = FitnessCache()
    cohort = [_ind(t, grammar) for t in ("mul(W, X)", "mul(X, W)", "neg(neg(mul(W, X)))", "add(W, G)")]
    rep = evaluate_cohort(cohort, FIDS, 2, SerialBackend(lambda: ev), cache)
    assert rep.cache_hits == 2
    assert [n for _, n in ev.calls].count(1) == 2  # two distinct forms at the first stage
    assert len({ind.fitness.values for ind in cohort[:3]}) == 1
    ev.calls.clear()
    again = [_ind("mul(X, W)", grammar)]
    rep = evaluate_cohort(again, FIDS, 2, SerialBackend(lambda: ev), cache)
    assert rep.cache_hits == 1 and ev.calls == [] and again[0].fitness.values == cohort[0].fitness.values


def test_successive_halving_promotes_the_top_one_over_eta():
    grammar = build_grammar(_space())
    ev = CountingEvaluator()
    texts = ["W", "X", "G", "abs(W)", "sqrt(X)", "sqr(G)", "add(W, X)", "mul(W, G)", "mul(sqrt(W), G)"]
    cohort = [_ind(t, grammar) for t in texts]
    evaluate_cohort(cohort, FIDS, 3, SerialBackend(lambda: ev), FitnessCache())
    per = {n: [t for t, m in ev.calls if m == n] for n in FIDS}
    assert [len(per[n]) for n in FIDS] == [9, 3, 1]
    assert set(per[2]) == {"W", "X", "G"} and per[4] == ["G"]  # ties: smaller, then key
    stages = sorted(ind.fitness.values[0] for ind in cohort)
    assert stages == [0] * 6 + [1, 1, 2]
    # A promoted candidate beats every unpromoted one, whatever their values at lower stages.
    best = max(cohort, key=lambda i: i.fitness)
    assert str(best) == "G" and best.fitness.values == (2, 1.25)


def test_child_equivalent_to_a_parent_is_regenerated():
    random.seed(0)
    w_only = space_from_dict({"leaves": ["W"], "operators": ["neg", "abs"],
                              "fidelity": {"windows": list(FIDS)},
                              "gp": {"cxpb": 0.0, "mutpb": 1.0, "mutations": ["node_replacement"],
                                     "max_regenerate": 3}})
    search = GPSearch(w_only, SerialBackend(CountingEvaluator), FIDS)
    grammar = search.grammar
    parent = _ind("abs(W)", grammar)
    parent2 = _ind("abs(W)", grammar)
    child = search.make_child(parent, parent2)
    # abs(W) can only become abs(W) or neg(W) by node replacement of the leaf (W->W); every try is
    # equivalent to the parent, so all 4 attempts are regenerations and the budget runs out.
    assert search.counters["oos_regenerated"] == 4 and search.counters["oos_exhausted"] == 1
    assert child.key == parent.key


def test_regeneration_finds_a_new_child_when_one_exists():
    space = _space(cxpb=0.0, mutpb=1.0, mutations=["node_replacement"], max_regenerate=50)
    search = GPSearch(space, SerialBackend(CountingEvaluator), FIDS)
    random.seed(1)
    parent = _ind("mul(W, X)", search.grammar)
    for _ in range(20):
        child = search.make_child(parent, parent)
        assert child.key != parent.key
    assert search.counters["oos_regenerated"] > 0 and search.counters["oos_exhausted"] == 0


def test_a_search_counts_its_savings():
    search = GPSearch(_space(population=6, offspring=6), SerialBackend(CountingEvaluator), FIDS)
    search.initialize()
    recs = [search.step() for _ in range(5)]
    assert sum(r["oos_saves"] for r in recs) == sum(r["cache_hits"] + r["oos_regenerated"] for r in recs) > 0
    assert all(math.isfinite(r["best_fitness"]) for r in recs)
