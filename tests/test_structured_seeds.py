"""`python -m metricgp.structured.experiments seeds`: one table per calibration seed, reuse of an
existing seed-0 table, the paired differences and their verdicts. Tiny random Llama only."""

from __future__ import annotations

import json
import math

import pytest

from metricgp.experiments.noise import relative
from metricgp.experiments.seeds import parse_pairs
from metricgp.experiments.structured import main


def _args(tiny_llama_dir, text_files, out, *extra: str) -> list[str]:
    return ["seeds", "--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4",
            "--seqlen", "32", "--dataset", str(text_files["test"]), "--eval-windows", "2", "--recover-tokens", "0",
            "--keeps", "0.7", "--methods", "wanda,wanda-refit,magnitude-uniform", "--no-progress",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, tiny_llama_dir, text_files):
    root = tmp_path_factory.mktemp("seeds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METRICGP_CACHE", str(root / "cache"))
        assert main(_args(tiny_llama_dir, text_files, root / "out", "--calib-seeds", "0,1")) == 0
    return root


def test_each_seed_draws_its_own_calibration_and_the_pairs_are_per_seed(seeds_run, text_files):
    out = seeds_run / "out"
    tables = {s: json.loads((out / f"seed{s}" / "table.json").read_text()) for s in (0, 1)}
    dataset = str(text_files["test"])
    wanda = {s: t["rows"]["wanda|0.7"]["oneshot"][dataset] for s, t in tables.items()}
    refit = {s: t["rows"]["wanda-refit|0.7"]["oneshot"][dataset] for s, t in tables.items()}
    assert wanda[0] != wanda[1]  # another calibration sample, other importances
    assert "--calib-seed 1" in tables[1]["rows"]["wanda|0.7"]["command"]
    assert "--calib-seed" not in tables[0]["rows"]["wanda|0.7"]["command"]
    summary = json.loads((out / "seeds.json").read_text())
    (group,) = [g for g in summary["groups"] if g["stage"] == "oneshot"]
    assert group["methods"]["wanda"]["per_seed"] == [wanda[0], wanda[1]]
    assert group["methods"]["wanda"]["std"] > 0
    (pair,) = group["pairs"]  # by default only X-refit vs X
    assert (pair["a"], pair["b"]) == ("wanda-refit", "wanda")
    assert pair["per_seed"] == pytest.approx([relative(refit[s], wanda[s]) for s in (0, 1)])
    assert pair["verdict"] in {"better", "worse", "within noise"}
    text = (out / "seeds.md").read_text()
    assert "wanda-refit vs wanda" in text and "Calibration seeds 0, 1" in text


def test_reuse_fills_seed_0_without_pruning_it_again(seeds_run, tiny_llama_dir, text_files, tmp_path,
                                                     monkeypatch):
    from metricgp.experiments import table

    monkeypatch.setenv("METRICGP_CACHE", str(seeds_run / "cache"))
    source = seeds_run / "out" / "seed0" / "table.json"
    monkeypatch.setattr(table, "prune", lambda *a, **k: pytest.fail("pruned a reused row"))
    assert main(_args(tiny_llama_dir, text_files, tmp_path / "out", "--calib-seeds", "0", "--reuse",
                      str(source), "--pairs", "wanda:magnitude-uniform")) == 0
    reused = json.loads((tmp_path / "out" / "seed0" / "table.json").read_text())
    assert reused["rows"] == json.loads(source.read_text())["rows"]
    assert reused["reused_from"] == str(source)
    summary = json.loads((tmp_path / "out" / "seeds.json").read_text())
    (pair,) = summary["groups"][0]["pairs"]
    assert (pair["a"], pair["b"], pair["verdict"]) == ("wanda", "magnitude-uniform", "n/a (one seed)")
    assert math.isfinite(pair["mean"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--pairs", "wanda:flap"], "--pairs: 'wanda:flap' must be A:B"),
    (["--pairs", "wanda"], "must be A:B"),
    (["--calib-seeds", "0,0"], "repeats a seed"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_llama_dir, text_files, tmp_path, capsys, extra, message):
    assert main(_args(tiny_llama_dir, text_files, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_default_pairs_are_the_refits_of_methods_that_are_present():
    assert parse_pairs(None, ["wanda", "wanda-refit", "evolved-refit"]) == [("wanda-refit", "wanda")]
    assert parse_pairs("evolved:wanda", ["evolved", "wanda"]) == [("evolved", "wanda")]
