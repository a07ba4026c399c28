"""The benchmark's metric panel and both benchmarks end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest

from metricgp.experiments.bench import main, metric_panel, spearman
from metricgp.expr import BUILTIN_METRICS, to_functional


def test_panel_is_distinct_seeded_and_large_enough():
    panel = metric_panel(7, seed=0)
    assert len(panel) == len(BUILTIN_METRICS) + 7 >= 10
    forms = [to_functional(t) for _, t in panel]
    assert len(set(forms)) == len(forms)
    assert forms == [to_functional(t) for _, t in metric_panel(7, seed=0)]
    assert forms != [to_functional(t) for _, t in metric_panel(7, seed=1)]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert math.isnan(spearman([1, 2, 3, 4], [5, 5, 5, 5]))  # a constant side has no rank order


def test_benchmarks_run_on_a_tiny_model(tmp_path, tiny_llama_dir, text_files, isolated_cache, monkeypatch, capsys):
    monkeypatch.setenv("METRICGP_DATA", str(tmp_path / "no-data"))
    common = ["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "2",
              "--seqlen", "32", "--random", "5", "--fidelities", "1,2"]
    # fitness data defaults to wikitext2 validation: point the data dir at a tiny copy
    (tmp_path / "no-data" / "wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "no-data" / "wikitext-2-raw" / "wiki.valid.raw").write_text(text_files["valid"].read_text())
    assert main(["throughput", *common, "--candidates", "3", "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "throughput.json").read_text())
    assert result["speedup_vs_naive"] > 1
    assert result["naive"]["validation_windows"] > 2
    profile = result["score_and_mask_profile_wanda"]
    phases = ("metric_and_checks", "mask", "apply", "count", "restore")
    assert set(profile) >= {*phases, "select_within_mask", "select_torch_kthvalue"}
    assert profile["total"] == pytest.approx(sum(profile[p] for p in phases), abs=0.01)
    assert profile["select_speedup_vs_torch_kthvalue"] > 0
    assert main(["refit-fidelity", *common, "--full", "2", "--out", str(tmp_path / "r")]) == 0
    refit = json.loads((tmp_path / "r" / "refit-fidelity.json").read_text())
    assert set(refit["spearman_vs_full"]) == {"1", "2"} and refit["non_degenerate"] >= 3
    magnitude = next(r for r in refit["rows"] if r["name"] == "magnitude")
    assert 0 < magnitude["fitness"]["1"] < 1 and magnitude["fitness"]["full"] > 1  # residual; perplexity
    assert (tmp_path / "r" / "refit-fidelity.png").stat().st_size > 1000
    fid_args = ["fidelity", *common, "--kl-fidelities", "1,3", "--full", "4", "--out", str(tmp_path / "f")]
    assert main(fid_args) == 0
    fid = json.loads((tmp_path / "f" / "fidelity.json").read_text())
    assert fid["metrics"] == len(BUILTIN_METRICS) + 5 and not (tmp_path / "f" / "fidelity.partial.json").exists()
    assert set(fid["spearman_vs_full"]) == {"1", "2", "kl1", "kl3"}
    wanda = next(r for r in fid["rows"] if r["name"] == "wanda")["fitness"]
    assert 0 < wanda["kl1"] < 5 < wanda["4"]  # KL in nats; perplexity of a tiny random model is large
    assert (tmp_path / "f" / "fidelity.png").stat().st_size > 1000
    # an interrupted panel resumes: a row left by the previous run (same arguments) is taken as is
    from metricgp.experiments.bench import PanelRows, build_parser

    formula = next(r for r in fid["rows"] if r["name"] == "wanda")["formula"]
    stored = {"name": "wanda", "formula": formula, "fitness": {**wanda, "4": 1234.5}}
    PanelRows(build_parser().parse_args(fid_args), "fidelity").add(stored)
    assert main(fid_args) == 0
    again = json.loads((tmp_path / "f" / "fidelity.json").read_text())
    assert next(r for r in again["rows"] if r["name"] == "wanda")["fitness"]["4"] == 1234.5
    assert next(r for r in again["rows"] if r["name"] == "magnitude") == next(
        r for r in fid["rows"] if r["name"] == "magnitude")  # the others measured again, identically


def test_panel_takes_hall_of_fame_formulas(tmp_path):
    entries = [{"rank": 1, "functional": "mul(abs(W), sqrt(X))"},  # = wanda, already in the panel
               {"rank": 2, "functional": "mul(abs(W), X)"}]
    (tmp_path / "hall_of_fame.json").write_text(json.dumps({"entries": entries}))
    panel = metric_panel(2, 0, run_dir=tmp_path)
    names = [n for n, _ in panel]
    assert names[len(BUILTIN_METRICS):] == ["hof-2", "random-1", "random-2"]
