"""`python -m metricgp.search` end to end on the synthetic evaluator, and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metricgp.cli.search import build_parser, evaluator_spec, main
from metricgp.search.artifacts import load_best, read_log

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "search_spaces" / "tiny.yaml")


def test_cli_run_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["--evaluator", "synthetic", "--space", TINY, "--generations", "3", "--population", "10",
               "--fidelities", "1,3", "--eta", "2", "--search-seed", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "best:" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 2 and config["fidelities"] == [1, 3]
    assert config["config"]["space"]["gp"]["population"] == 10
    assert "command" in config and "versions" in config and "git" in config
    log = read_log(out)
    assert [r["gen"] for r in log] == [0, 1, 2, 3]
    for key in ("best_fitness", "median_fitness", "diversity", "unique_forms", "cache_hits", "oos_saves",
                "evaluations_per_fidelity", "seconds"):
        assert key in log[-1], key
    assert set(log[0]["evaluations_per_fidelity"]) == {"1", "3"}
    hof = json.loads((out / "hall_of_fame.json").read_text())["entries"]
    assert hof and {"functional", "infix", "latex", "sympy", "size", "fitness_by_fidelity"} <= set(hof[0])
    best = json.loads((out / "best.json").read_text())
    assert best["formula"] == hof[0]["functional"] and best["fidelity"] == 3 and best["run"] == "demo"
    assert str(load_best(out)) == best["formula"]
    for png in ("fitness.png", "size_diversity.png", "fitness_vs_size.png"):
        assert (out / png).stat().st_size > 1000
    assert "| rank | formula |" in (out / "README.md").read_text()
    # resume with more generations continues the same run
    assert main(["--resume", str(out), "--generations", "4", "--no-progress"]) == 0
    assert [r["gen"] for r in read_log(out)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("argv, message", [
    (["--space", "nope.yaml"], "nope.yaml: cannot read search space"),
    (["--space", TINY, "--population", "1"], "command line: gp.population: must be >= 2"),
    (["--space", TINY, "--sparsity", "1.5"], "sparsity must be strictly between 0 and 1, got 1.5"),
    (["--space", TINY, "--pattern", "2:4", "--sparsity", "0.7"],
     "pattern 2:4 fixes sparsity at 0.5; got --sparsity 0.7"),
    (["--space", TINY, "--pattern", "blocky"], "unknown pattern 'blocky'"),
    (["--resume", "no/such/run"], "no/such/run: no checkpoint.pkl to resume from"),
    (["--resume", "no/such/run", "--search-seed", "1"], "--resume continues the run as configured; drop --search-seed"),
    (["--resume", "no/such/run", "--space", TINY], "drop --space (only --generations, --backend, --workers, "
     "--gpus-per-worker, --ray-address, --time-budget may change)"),
    (["--space", TINY, "--backend", "ray", "--workers", "0"], "--workers must be >= 1"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    fresh = [] if "--resume" in argv else ["--evaluator", "synthetic", "--out", str(tmp_path / "r")]
    rc = main([*fresh, "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_the_searched_pattern_is_what_the_config_records(tmp_path, capsys):
    """An N:M pattern fixes the sparsity the run records (no silent 0.5 default next to 1:4), and
    the README's `--seed` still sets the search seed (a deprecated alias of --search-seed)."""
    out = tmp_path / "nm"
    assert main(["--evaluator", "synthetic", "--space", TINY, "--generations", "0", "--pattern", "1:4",
                 "--seed", "3", "--calib-seed", "5", "--out", str(out), "--no-progress"]) == 0
    assert "--seed is deprecated; use --search-seed" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 3 and config["config"]["space"]["gp"]["seed"] == 3
    assert config["config"]["evaluator_spec"]["sparsity"] == 0.25
    assert config["config"]["evaluator_spec"]["seed"] == 5  # the synthetic evaluator's data seed


def test_model_evaluator_spec_holds_the_resolved_pattern():
    args = build_parser().parse_args(["--pattern", "2:4", "--seqlen", "128", "--calib-seed", "4"])
    spec = evaluator_spec(args, (1, 2))
    assert spec["pattern"] == "2:4" and spec["sparsity"] == 0.5
    assert spec["seqlen"] == 128 and spec["seed"] == 4
    args = build_parser().parse_args(["--pattern", "UNSTRUCTURED"])
    assert evaluator_spec(args, (1,))["pattern"] == "unstructured" and evaluator_spec(args, (1,))["sparsity"] == 0.5


def test_references_are_scored_on_the_best_windows_and_survive_resume(tmp_path):
    from metricgp.expr.builtins import resolve_metric
    from metricgp.search.synthetic import SyntheticSpec, build_synthetic

    out = tmp_path / "scratch"
    argv = ["--evaluator", "synthetic", "--space", TINY, "--generations", "2", "--population", "8",
            "--fidelities", "1,3", "--eta", "2", "--references", "wanda,mul(abs(W), G)", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    log = read_log(out)
    evaluator = build_synthetic(SyntheticSpec(fidelities=(1, 3)))

    for rec in log:
        n = rec["best_fidelity"]
        assert set(rec["references"]) == {"wanda", "mul(abs(W), G)"}
        # the reference is the evaluator's own fitness of that metric on the best's windows
        assert rec["references"]["wanda"] == pytest.approx(evaluator.evaluate(resolve_metric("wanda"), n).fitness)
    # references are not search evaluations
    assert sum(log[0]["evaluations_per_fidelity"].values()) <= 8 + 4
    readme = (out / "README.md").read_text()
    assert "| gen | evaluations so far | best | windows | wanda | mul(abs(W), G) |" in readme
    assert (out / "references.png").stat().st_size > 1000 and "references.png" in readme
    assert main(["--resume", str(out), "--generations", "3", "--no-progress"]) == 0
    last = read_log(out)[-1]
    assert last["gen"] == 3
    assert last["references"]["wanda"] == pytest.approx(
        evaluator.evaluate(resolve_metric("wanda"), last["best_fidelity"]).fitness)


def test_a_bad_reference_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["--evaluator", "synthetic", "--space", TINY, "--references", "wanda,foo(W)", "--out",
              str(tmp_path / "r"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "reference 'foo(W)'" in err and "Traceback" not in err
