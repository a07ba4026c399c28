"""`python -m metricgp.search --structured`: a metric evolved with the structured evaluator as fitness,
under the "global" simplification scope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metricgp.cli.search import main
from metricgp.evaluate import EvaluatorSpec
from metricgp.expr import parse
from metricgp.structured.evaluator import StructuredSpec, prune
from metricgp.structured.fitness import StructuredMetricEvaluator

TINY = str(Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml")


@pytest.fixture()
def model_args(tiny_llama_dir, text_files, isolated_cache):
    return ["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--valid", str(text_files["valid"]),
            "--n-calib", "4", "--seqlen", "32"]


def test_structured_search_runs_with_global_scope(tmp_path, model_args):
    out = tmp_path / "run"
    assert main(["--structured", "--keep", "0.7", "--space", TINY, "--generations", "2", "--population", "6",
                 "--offspring", "3", "--fidelities", "1,2", "--out", str(out), "--no-progress", *model_args]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["evaluator"] == "structured"
    assert config["config"]["evaluator_spec"]["structured"] == {"keep": 0.7}
    assert "structured, 0.7 of decoder parameters kept" in (out / "README.md").read_text()
    assert json.loads((out / "best.json").read_text())["formula"]


def test_structured_fitness_equals_the_shrunk_model(tiny_llama_dir, text_files, isolated_cache):
    """Masking inside the search gives the perplexity of the physically pruned model."""
    from metricgp.measure import perplexity

    spec = EvaluatorSpec(model=str(tiny_llama_dir), calib=str(text_files["calib"]), valid=str(text_files["valid"]),
                         n_calib=4, seqlen=32, fidelities=(2,))
    structured = StructuredSpec(keep=0.6)
    evaluator = StructuredMetricEvaluator(spec, structured)
    assert evaluator.scope == "global"
    tree = parse("mul(abs(W), sqrt(X))")
    result = evaluator.evaluate(tree, 2)
    model, sizes = prune(evaluator.setup, tree, structured)
    assert result.fitness == pytest.approx(perplexity(model, evaluator.valid[:2]), rel=1e-5)
    assert result.sparsity == pytest.approx(1 - sizes["achieved_keep"])
    # the dense weights are back after the evaluation
    again = evaluator.evaluate(tree, 2)
    assert again.fitness == result.fitness


def test_structured_search_user_errors(tmp_path, model_args, capsys):
    assert main(["--structured", "--keep", "1.5", "--space", TINY, "--out", str(tmp_path / "a"), *model_args]) == 2
    assert "--keep must be in (0, 1]" in capsys.readouterr().err
    assert main(["--keep", "0.5", "--space", TINY, "--out", str(tmp_path / "b"), *model_args]) == 2
    assert "--keep needs --structured" in capsys.readouterr().err
    assert main(["--structured", "--pattern", "2:4", "--space", TINY, "--out", str(tmp_path / "c"), *model_args]) == 2
    assert "not --pattern/--sparsity" in capsys.readouterr().err
