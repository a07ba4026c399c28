"""OOS in the search: children are simplified, a child equivalent to a parent is regenerated, an
equivalent of an evaluated tree is answered from the cache; and the staged (multi-fidelity) race."""

from __future__ import annotations

import math
import random

import pytest

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


def test_a_search_counts_its_savings(monkeypatch):
    import metricgp.search.gp as gp_module

    oos_calls = []

    def counting_oos(ind, grammar, scope):
        oos_calls.append(1)
        return apply_oos(ind, grammar, scope)

    monkeypatch.setattr(gp_module, "apply_oos", counting_oos)
    ev = CountingEvaluator()
    search = GPSearch(_space(population=6, offspring=6), SerialBackend(lambda: ev), FIDS)
    recs = [search.initialize()]
    oos_calls.clear()
    recs += [search.step() for _ in range(5)]
    # every candidate (the initial population, then 5 x 6 children) is either a new canonical form,
    # with one cache entry, or answered from the cache
    assert sum(r["cache_hits"] for r in recs) + len(search.cache.results) == 6 + 5 * 6
    assert sum(r["cache_hits"] for r in recs[1:]) > 0
    # the evaluator saw each new form once at the first fidelity, except forms without a leaf
    no_leaf = sum(1 for form, _ in search.cache.forms.values() if not parse(form).leaves_used())
    assert len([t for t, n in ev.calls if n == FIDS[0]]) == len(search.cache.results) - no_leaf
    # each regeneration is one more OOS pass: a child takes 1 + its regenerations, but an exhausted
    # child's last attempt is counted as a regeneration and kept
    regenerated = sum(r["oos_regenerated"] for r in recs)
    assert regenerated == search.counters["oos_regenerated"] > 0
    assert len(oos_calls) == 5 * 6 + regenerated - search.counters["oos_exhausted"]
    assert all(math.isfinite(r["best_fitness"]) for r in recs)


def test_scope_comes_from_the_evaluator_and_drives_oos_and_the_cache():
    """Under "global" (structure scores ranked across layers) a root shift or mms is a different
    metric: it gets its own key, its own evaluation and its own place in the population."""

    class GlobalEvaluator(CountingEvaluator):
        scope = "global"

    space = _space()
    texts = ["mul(abs(W), sqrt(X))", "add(mul(abs(W), sqrt(X)), 1.0)", "mul(2.0, mul(abs(W), sqrt(X)))"]
    for evaluator, distinct in ((CountingEvaluator(), 1), (GlobalEvaluator(), 2)):
        search = GPSearch(space, SerialBackend(lambda ev=evaluator: ev), FIDS)
        assert search.scope == getattr(evaluator, "scope", "tensor")
        cohort = [search._oos(node_to_tree(parse(t), search.grammar)) for t in texts]
        assert len({ind.key for ind in cohort}) == distinct
        evaluate_cohort(cohort, FIDS, 2, search.backend, search.cache)
        assert len([t for t, n in evaluator.calls if n == FIDS[0]]) == distinct
        assert search.state_dict()["scope"] == search.scope
    tensor = GPSearch(space, SerialBackend(CountingEvaluator), FIDS, scope="tensor")
    with pytest.raises(ValueError, match="scope 'global'"):
        tensor.load_state_dict({**search.state_dict()})
