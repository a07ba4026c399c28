"""The level search without a model: exact size under every mutation, start genomes, the stage
schedule's bookkeeping, the prior, OWL's allocation and a resumable search state."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from metricgp.darwin.levels import Gene, LevelSpace, split_levels, spread, start_genome
from metricgp.darwin.mutation import mutate, n_switches, offspring, switch
from metricgp.darwin.owl import outlier_ratio, owl_sparsities
from metricgp.darwin.prior import MetricPrior, cumulative
from metricgp.darwin.search import LevelSearch, SearchConfig
from metricgp.darwin.stages import Stage, make_schedule, select
from metricgp.errors import MetricGPError
from metricgp.ranking import spearman


def random_space(rng: random.Random) -> LevelSpace:
    genes = []
    for k in range(rng.randint(1, 4)):
        step, top = rng.randint(1, 500), rng.randint(1, 10)
        genes += [Gene(f"k{k}.{i}", f"k{k}", top, step, step * (top + 1)) for i in range(rng.randint(1, 6))]
    rng.shuffle(genes)
    return LevelSpace(tuple(genes), sum(g.full for g in genes) + rng.randint(0, 1000))


def random_prior(space: LevelSpace, rng: random.Random) -> MetricPrior:
    return MetricPrior([cumulative([rng.random() for _ in range(g.max_level)], 1, g.max_level) for g in space.genes])


def kind_sums(space: LevelSpace, genome) -> dict[str, int]:
    return {k: sum(genome[i] for i in idx) for k, idx in space.kinds().items()}


@pytest.mark.parametrize("biased", [False, True])
def test_every_mutation_preserves_the_size_exactly(biased):
    rng = random.Random(7)
    for _ in range(300):
        space = random_space(rng)
        genome = tuple(rng.randint(0, g.max_level) for g in space.genes)
        bias = random_prior(space, rng) if biased else None
        for _ in range(10):
            child = mutate(genome, space, rng, bias)
            assert space.removed(child) == space.removed(genome)  # exact, in parameters
            assert kind_sums(space, child) == kind_sums(space, genome)  # switches stay within a kind
            assert all(0 <= lv <= g.max_level for lv, g in zip(child, space.genes, strict=True))
            moved = sum(abs(a - b) for a, b in zip(child, genome, strict=True))
            assert moved <= 2 * 3 and moved % 2 == 0  # at most three switches of one up + one down
            genome = child


def test_one_switch_moves_two_genes_of_one_kind():
    space = LevelSpace((Gene("a0", "a", 3, 10, 40), Gene("a1", "a", 3, 10, 40), Gene("b0", "b", 3, 7, 28)), 200)
    rng = random.Random(0)
    for _ in range(200):
        g = [1, 2, 0]
        assert switch(g, space, rng)
        assert sorted(g[:2]) in ([0, 3], [1, 2], [2, 1]) and g[2] == 0 and sum(g[:2]) == 3
    stuck = [0, 0, 3]  # kind a has nothing to give, kind b a single gene
    assert not switch(stuck, space, rng) and stuck == [0, 0, 3]


def test_number_of_switches_is_min_of_two_uniforms():
    rng = random.Random(1)
    counts = Counter(n_switches(rng) for _ in range(9000))
    for n, p in ((1, 5 / 9), (2, 3 / 9), (3, 1 / 9)):
        assert abs(counts[n] / 9000 - p) < 0.02


def test_offspring_are_distinct_and_never_the_parent():
    space = LevelSpace(tuple(Gene(f"m{i}", "mlp", 10, 96, 960) for i in range(6)), 10_000)
    parent = (5, 5, 5, 5, 5, 5)
    children, rejected = offspring(parent, 16, space, random.Random(3))
    assert len(children) == 16 == len(set(children)) and parent not in children
    tiny = LevelSpace((Gene("a", "k", 1, 5, 10), Gene("b", "k", 1, 5, 10)), 20)
    children, rejected = offspring((1, 0), 4, tiny, random.Random(0))
    assert children == [(0, 1)] and rejected > 0  # only one other genome of this size exists


def test_uniform_start_hits_the_budget_whenever_the_steps_allow():
    rng = random.Random(5)
    for _ in range(300):
        space = random_space(rng)
        finest = min(g.step for g in space.genes)
        budget = rng.randint(0, space.capacity())
        kinds = space.kinds()
        per_level = [space.step(k) for k in kinds]
        tops = [sum(space.genes[i].max_level for i in idx) for idx in kinds.values()]
        if math.prod(t + 1 for t in tops) > 5000:
            continue  # too many combinations for the brute force below
        nearest = min(abs(budget - sum(n * s for n, s in zip(ns, per_level, strict=True)))
                      for ns in itertools.product(*(range(t + 1) for t in tops)))  # brute force
        if 2 * nearest > finest:  # a gap of the grid (a fine kind with little room): refused
            with pytest.raises(MetricGPError, match="unreachable"):
                start_genome(space, budget)
            continue
        genome = start_genome(space, budget)
        assert abs(space.removed(genome) - budget) * 2 <= finest
        for idx in kinds.values():  # uniform: levels of one kind differ by at most one
            assert max(genome[i] for i in idx) - min(genome[i] for i in idx) <= 1
    space = LevelSpace((Gene("a", "k", 2, 10, 30), Gene("b", "k", 2, 10, 30)), 100)
    with pytest.raises(MetricGPError, match="unreachable"):
        start_genome(space, 60, what="--keep 0.4")  # at most 40 of 100 can go
    with pytest.raises(MetricGPError, match="unreachable"):
        start_genome(space, -1)


def test_split_follows_the_desired_shares_and_spread_the_weights():
    space = LevelSpace((Gene("a0", "attn", 2, 100, 300), Gene("a1", "attn", 2, 100, 300),
                        Gene("m0", "mlp", 10, 10, 110), Gene("m1", "mlp", 10, 10, 110)), 1000)
    assert split_levels(space, 300, {"attn": 100, "mlp": 200}) == {"attn": 1, "mlp": 20}
    assert split_levels(space, 300, {"attn": 300, "mlp": 0}) == {"attn": 3, "mlp": 0}
    assert spread(7, [1, 1, 1], [5, 5, 5]) == [3, 2, 2]
    assert spread(6, [0, 1, 2], [5, 5, 1]) == [0, 5, 1]  # capped genes pass their share on
    assert start_genome(space, 300, [0, 1, 3, 1], {"attn": 100, "mlp": 200}) == (0, 1, 10, 10)


def test_stage_schedule_validation():
    assert make_schedule("4,2,1", "2,4,8", "2k,4k,8k") == (Stage(4, 2, 2000), Stage(2, 4, 4000), Stage(1, 8, 8000))
    assert make_schedule([1], [3]) == (Stage(1, 3, 0),)
    for args, message in ((("4,2", "2,4"), "decrease strictly to 1"), (("2,2,1", "1,2,3"), "decrease strictly"),
                          (("2,1", "4,2"), "non-decreasing"), (("2,1", "2"), "one survivor count"),
                          (("2,1", "1,2", "5,-1"), ">= 0"), (("x", "1"), "comma-separated integers")):
        with pytest.raises(MetricGPError, match=message):
            make_schedule(*args)


def test_staged_selection_bookkeeping():
    stages = make_schedule("3,2,1", "1,2,4", "10,20,40")
    calls: list[tuple[int, list]] = []
    value = {(i,): float(i) for i in range(10)}

    def score(genomes, k):
        calls.append((k, list(genomes)))
        return [value[g] + 0.01 * k for g in genomes]

    cache: dict = {}
    parent = (4,)
    kids = [(7,), (2,), (9,), (1,), (5,), (3,)]
    sel = select(kids, parent, stages, score, cache)
    assert [k for k, _ in calls] == [0, 1, 2]
    assert calls[0][1] == kids  # every offspring on the first stage
    assert calls[1][1] == [(1,), (2,), (3,)]  # the 3 best survive, best first
    assert calls[2][1] == [parent, (1,), (2,)]  # the parent joins before the last stage
    assert sel.winner == (1,) and sel.fitness == 1.02 and sel.new_evaluations == [6, 3, 3]
    assert [len(s) for s in sel.evaluated] == [6, 3, 3]
    calls.clear()  # next generation: the parent's last-stage score comes from the cache
    sel = select([(0,), (8,)], (1,), stages, score, cache)
    assert calls == [(0, [(0,), (8,)]), (1, [(0,), (8,)]), (2, [(0,), (8,)])] and sel.winner == (0,)
    sel = select([(6,)], (0,), make_schedule("1", "1"), lambda g, k: [0.0] * len(g), {})
    assert sel.winner == (0,)  # a tie keeps the parent


def test_backend_scorer_sends_each_stage_its_windows_and_training_budget():
    from metricgp.darwin.fitness import Candidate
    from metricgp.darwin.search import backend_scorer
    from metricgp.evaluate import FitnessResult

    class Recorder:
        jobs: list = []

        def evaluate(self, jobs):
            self.jobs += list(jobs)
            return [FitnessResult(float(c.genome[0]), n, None, 0.0, 0.0) for c, n in jobs]

    backend = Recorder()
    stages = make_schedule("2,1", "2,8", "2k,8k")
    sel = select([(3,), (1,), (2,)], (5,), stages, backend_scorer(backend, stages), {})
    assert sel.winner == (1,)
    assert backend.jobs == [(Candidate((3,), 2000), 2), (Candidate((1,), 2000), 2), (Candidate((2,), 2000), 2),
                            (Candidate((5,), 8000), 8), (Candidate((1,), 8000), 8), (Candidate((2,), 8000), 8)]


def test_prior_predicts_screens_and_weights_by_rank():
    prior = MetricPrior([[0.0, 1.0, 3.0], [0.0, 0.5, 5.0], [0.0, 2.0, 2.5]])
    assert prior.predicted((1, 1, 2)) == 4.0
    assert prior.screen([(2, 0, 0), (0, 1, 0), (0, 0, 1)], 2) == [(0, 1, 0), (0, 0, 1)]  # 3.0, 0.5, 2.0
    assert prior.up((0, 0, 0), [0, 1, 2]) == [2.0, 3.0, 1.0]  # cheapest next level most likely
    assert prior.down((1, 2, 1), [0, 1, 2]) == [1.0, 3.0, 2.0]  # dearest current level most likely
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_owl_allocation():
    s = owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.7, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)  # min-max scaled to 2 * lambda
    assert s[3] == min(s) and s[0] == max(s)  # more outliers, less pruning
    assert owl_sparsities([0.2, 0.2], 0.5) == [0.5, 0.5]
    import torch

    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0])], m=5) == 1 / 8


def _search(space: LevelSpace, seed: int = 0) -> LevelSearch:
    target = [((i * 7) % 5) for i in range(len(space.genes))]

    def score(genomes, k):  # a deterministic landscape: distance to a target genome
        return [sum(abs(a - b) for a, b in zip(g, target, strict=True)) + 0.1 * k for g in genomes]

    config = SearchConfig(make_schedule("3,1", "1,2"), offspring=6, generations=12, seed=seed, screen=4)
    prior = MetricPrior([cumulative([float(j % 3) for j in range(g.max_level)], 1, g.max_level) for g in space.genes])
    return LevelSearch(space, config, score, start_genome(space, space.capacity() // 2), prior)


def test_search_improves_and_its_state_resumes_exactly():
    space = LevelSpace(tuple(Gene(f"m{i}", "mlp" if i % 2 else "attn", 4, 10 if i % 2 else 30, 0)
                             for i in range(8)), 1000)
    full = _search(space)
    records = [full.initialize()] + [full.step() for _ in range(12)]
    assert records[-1]["fitness"] <= records[0]["fitness"]
    assert all(r["kept"] == records[0]["kept"] for r in records)  # the size never moves
    part = _search(space)
    part.initialize()
    for _ in range(5):
        part.step()
    state = part.state_dict()
    resumed = _search(space)
    resumed.load_state_dict(state)
    rest = [resumed.step() for _ in range(7)]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(resumed.records) == strip(records) and strip(rest) == strip(records[6:])
