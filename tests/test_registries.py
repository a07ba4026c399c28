"""Every pluggable choice is a dict from name to callable (as PRUNE_MODES): adding one is one entry,
and the command lines, the space validation and the search pick it up."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metricgp.errors import MetricGPError
from metricgp.evaluate import FITNESSES, EvaluatorSpec, Fitness, FitnessResult, MetricEvaluator
from metricgp.expr import parse
from metricgp.measure import DenseReference
from metricgp.prune.engine import PRUNE_MODES, DenseWeights
from metricgp.prune.patterns import PATTERNS
from metricgp.search.backends import BACKENDS, SerialBackend, make_backend
from metricgp.search.breeding import ALGORITHMS, MUTATIONS
from metricgp.search.gp import GPSearch
from metricgp.search.run import EVALUATORS, RunConfig, start
from metricgp.search.space import load_space, space_from_dict, with_overrides
from metricgp.search.synthetic import SyntheticSpec, build_synthetic

TINY = Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml"
FIDS = (2, 4, 8)


@pytest.mark.parametrize("registry", [ALGORITHMS, MUTATIONS, EVALUATORS, BACKENDS, PRUNE_MODES])
def test_registries_map_names_to_callables(registry):
    assert isinstance(registry, dict) and registry
    assert all(isinstance(k, str) and callable(v) for k, v in registry.items())


def test_fitness_and_pattern_registries_hold_records():
    assert set(FITNESSES) == {"ppl", "kl"} and all(isinstance(f, Fitness) for f in FITNESSES.values())
    assert FITNESSES["kl"].reference is not None and FITNESSES["ppl"].reference is None
    assert all(callable(kind.build) for kind in PATTERNS.values())


def _synthetic():
    return SerialBackend(functools.partial(build_synthetic, SyntheticSpec(fidelities=FIDS)))


def test_a_new_replacement_algorithm_is_one_entry(monkeypatch):
    calls = []

    def keep_parents(population, children, size):
        calls.append((len(population), len(children), size))
        return list(population), len(children)

    monkeypatch.setitem(ALGORITHMS, "keep_parents", keep_parents)
    space = with_overrides(load_space(TINY), gp={"algorithm": "keep_parents", "seed": 0})
    search = GPSearch(space, _synthetic(), FIDS)
    search.initialize()
    before = [str(ind.node) for ind in search.population]
    rec = search.step()
    assert calls == [(12, 6, 12)] and rec["duplicates_rejected"] == 6
    assert [str(ind.node) for ind in search.population] == before
    with pytest.raises(MetricGPError, match="unknown algorithm 'nope'"):
        space_from_dict({"leaves": ["W"], "operators": ["abs"], "gp": {"algorithm": "nope"}})


def test_a_new_mutation_is_one_entry(monkeypatch):
    used = []

    def to_first_leaf(pset):
        def mutate(ind):
            used.append(str(ind))
            return (type(ind)([node for node in ind if node.arity == 0][:1]),)

        return mutate

    monkeypatch.setitem(MUTATIONS, "to_first_leaf", to_first_leaf)
    space = with_overrides(load_space(TINY), gp={"mutations": ["to_first_leaf"], "cxpb": 0.0, "mutpb": 1.0})
    search = GPSearch(space, _synthetic(), FIDS)
    search.initialize()
    before = set(search.cache.forms)
    search.step()
    assert len(used) >= space.gp.offspring  # every child is a mutant (no crossover)
    new_forms = {search.cache.forms[k][0] for k in set(search.cache.forms) - before}
    assert new_forms <= {"W", "X", "G"}  # and every mutant is the parent's first leaf


def test_a_new_evaluator_is_one_entry(monkeypatch, tmp_path):
    class SizeEvaluator:
        """Fitness = tree size: the search must find a lone leaf."""

        fidelities = (1, 2)

        def evaluate(self, tree, n_windows):
            return FitnessResult(float(tree.size()), n_windows, None, 0.0, 0.5)

    monkeypatch.setitem(EVALUATORS, "size", lambda spec: SizeEvaluator)
    space = with_overrides(load_space(TINY), gp={"generations": 2, "population": 6, "offspring": 3},
                           fidelity={"windows": (1, 2)})
    search = start(RunConfig(space=space, evaluator="size", name="size"), tmp_path)
    assert search.hof[0].fitness.values == (1, 1.0) and search.scope == "tensor"


def test_a_new_backend_is_one_entry(monkeypatch):
    made = []

    def counting(factory, workers, gpus_per_worker, address):
        made.append((workers, gpus_per_worker, address))
        return SerialBackend(factory)

    monkeypatch.setitem(BACKENDS, "counting", counting)
    factory = functools.partial(build_synthetic, SyntheticSpec(fidelities=FIDS))
    backend = make_backend("counting", factory, 3, 0.5, "head:6379")
    assert made == [(3, 0.5, "head:6379")] and backend.fidelities() == FIDS and backend.scope() == "tensor"
    with pytest.raises(MetricGPError, match="unknown backend 'nope'"):
        make_backend("nope", lambda: None)


class _CountingModel(torch.nn.Module):
    """Uniform next-token logits over 5 tokens; counts the windows it has run."""

    def __init__(self):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.zeros(5))
        self.windows = 0

    def forward(self, input_ids, use_cache=False):
        self.windows += len(input_ids)
        return SimpleNamespace(logits=self.logit.expand(*input_ids.shape, 5))


class _NoModelSetup:
    """Just enough of a PruningSetup for MetricEvaluator without a real model (no prunable layers)."""

    dense = DenseWeights({})
    stats: dict = {}

    def __init__(self):
        self.model = _CountingModel()

    def fitness_windows(self, n):
        return torch.zeros(n, 4, dtype=torch.long)


def test_a_new_fitness_is_one_entry(monkeypatch):
    seen = []

    def windows_seen(losses, n):
        seen.append((len(losses.nll), len(losses.kl), n))
        return float(n)

    monkeypatch.setitem(FITNESSES, "windows", Fitness(windows_seen, DenseReference.build))
    ev = MetricEvaluator(EvaluatorSpec(fitness="windows", fidelities=(1, 3)), setup=_NoModelSetup())
    built = ev.setup.model.windows  # the dense reference ran every validation window once
    assert built == 3 and len(ev.reference.top_logp) == 3
    assert ev.evaluate(parse("abs(W)"), 3).fitness == 3.0
    assert seen == [(3, 3, 3)] and ev.scope == "tensor"
    with pytest.raises(MetricGPError, match="unknown fitness 'nope'"):
        MetricEvaluator(EvaluatorSpec(fitness="nope"), setup=_NoModelSetup())


def test_a_promoted_candidate_runs_only_its_new_windows():
    ev = MetricEvaluator(EvaluatorSpec(fidelities=(1, 2, 5)), setup=_NoModelSetup())
    model = ev.setup.model
    first = ev.evaluate(parse("abs(W)"), 1)
    assert model.windows == 1 and first.fitness == pytest.approx(5.0)  # uniform over 5 tokens
    assert ev.evaluate(parse("abs(W)"), 5).fitness == pytest.approx(5.0) and model.windows == 5
    assert ev.evaluate(parse("abs(W)"), 2).n_windows == 2 and model.windows == 5  # a prefix: no forward
    ev.evaluate(parse("sqr(W)"), 2)
    assert model.windows == 7  # another formula starts from its first window


def test_the_evaluator_refuses_a_pattern_that_contradicts_its_sparsity():
    # the search's evaluator used to pass no sparsity for N:M, so 2:4 ran while 0.7 was reported
    with pytest.raises(MetricGPError, match="pattern 2:4 fixes sparsity at 0.5; got --sparsity 0.7"):
        MetricEvaluator(EvaluatorSpec(pattern="2:4", sparsity=0.7), setup=_NoModelSetup())
    ev = MetricEvaluator(EvaluatorSpec(pattern="1:4", sparsity=0.25, fidelities=(1,)), setup=_NoModelSetup())
    assert ev.pattern.sparsity == 0.25
