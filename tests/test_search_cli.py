"""`python -m metricgp.search` end to end on the synthetic evaluator, and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metricgp.search.__main__ import main
from metricgp.search.artifacts import load_best, read_log

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "search_spaces" / "tiny.yaml")


def test_cli_run_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["--evaluator", "synthetic", "--space", TINY, "--generations", "3", "--population", "10",
               "--fidelities", "1,3", "--eta", "2", "--seed", "2", "--out", str(out), "--no-progress"])
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
    (["--space", TINY, "--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
    (["--resume", "no/such/run"], "no/such/run: no checkpoint.pkl to resume from"),
    (["--resume", "no/such/run", "--seed", "1"], "--resume continues the run as configured; drop --seed"),
    (["--space", TINY, "--backend", "ray", "--workers", "0"], "--workers must be >= 1"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    rc = main(["--evaluator", "synthetic", "--out", str(tmp_path / "r"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
