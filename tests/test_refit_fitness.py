"""The refit-residual fitness (search for what is best after reconstruction) on a tiny Llama."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metricgp.evaluate import EvaluatorSpec
from metricgp.expr import compile_metric, parse, resolve_metric
from metricgp.refit_fitness import RefitResidualEvaluator, spread_order
from metricgp.search.run import RunConfig, start
from metricgp.search.space import load_space, with_overrides

TINY = Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml"


def test_spread_order_covers_the_range_and_every_prefix_spreads():
    assert spread_order(5) == [0, 4, 2, 1, 3]
    for n in (1, 2, 7, 30):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
    assert set(spread_order(30)[:3]) == {0, 29, 14}


@pytest.fixture(scope="module")
def evaluator(tiny_llama_dir, text_files, tmp_path_factory):
    import os

    os.environ["METRICGP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    spec = EvaluatorSpec(model=str(tiny_llama_dir), calib=str(text_files["calib"]), n_calib=4,
                         valid=str(text_files["valid"]), seqlen=32, fidelities=(1, 2))
    return RefitResidualEvaluator(spec, rows_per_layer=8)


def _exact_residual(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor) -> float:
    """Per-row exact masked least squares with reconstruct's ridge; residual energy under the plain H."""
    from metricgp.prune.reconstruct import RIDGE

    plain = h.double()
    ridged = plain + RIDGE * plain.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    num = den = 0.0
    for r in range(w.shape[0]):
        wr, s = w[r].double(), keep[r]
        x = torch.zeros_like(wr)
        x[s] = torch.linalg.solve(ridged[s][:, s], (wr @ ridged)[s])
        d = wr - x
        num += float(d @ plain @ d)
        den += float(wr @ plain @ wr)
    return num / den


def test_the_residual_is_the_exact_masked_least_squares_optimum(evaluator):
    name, rows = evaluator.layers[0][0]
    metric = compile_metric(resolve_metric("wanda"))
    got = evaluator.layer_residual(metric, name, rows)
    w = evaluator.setup.dense.weights[name].float()
    keep = evaluator.pattern.mask(metric({"W": w, **evaluator.setup.stats[name]}))[rows]
    expected = _exact_residual(w[rows], keep, evaluator.hessians[name])
    assert 0 < got < 1
    assert got == pytest.approx(expected, rel=1e-3)  # CG converges on this small system


def test_pruning_the_largest_weights_scores_worse_than_pruning_the_smallest(evaluator):
    small = evaluator.evaluate(parse("abs(W)"), 2)
    large = evaluator.evaluate(parse("neg(abs(W))"), 2)
    assert math.isfinite(small.fitness) and large.fitness > small.fitness
    assert small.n_windows == 2 and small.sparsity == pytest.approx(0.5)
    assert evaluator.evaluate(parse("1.0"), 1).reason is not None  # constant in every row: degenerate
    # the model is untouched: evaluation never writes into it
    for name, w in evaluator.setup.dense.weights.items():
        assert torch.equal(evaluator.setup.layers[name].weight, w)


def test_a_search_runs_with_the_refit_fitness(tmp_path, tiny_llama_dir, text_files, isolated_cache):
    space = with_overrides(load_space(TINY), gp={"generations": 1, "seed": 0, "population": 4, "offspring": 2})
    spec = {"model": str(tiny_llama_dir), "calib": str(text_files["calib"]), "valid": str(text_files["valid"]),
            "n_calib": 4, "seqlen": 32, "fidelities": (1, 2)}
    search = start(RunConfig(space=space, evaluator="refit", evaluator_spec=spec, name="r"), tmp_path / "r")
    assert search.gen == 1 and len(search.hof) >= 1
    assert 0 < search.hof[0].fitness.values[1] < 1
    assert "output residual after the least-squares refit" in (tmp_path / "r" / "README.md").read_text()
