"""`python -m metricgp.apply` end to end on a tiny saved model, and its user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from metricgp.cli.apply import main
from metricgp.evaluate import EvaluatorSpec, PruningSetup
from metricgp.expr import resolve_metric
from metricgp.prune.patterns import NM


def _refuse(constant: str):
    raise AssertionError(f"{constant} is not JSON")


@pytest.fixture()
def base_args(tiny_llama_dir, text_files, isolated_cache):
    return ["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4",
            "--seqlen", "32", "--dataset", str(text_files["test"]), "--eval-windows", "4"]


def test_apply_writes_a_reloadable_pruned_model_and_report(tmp_path, base_args, tiny_llama_dir, text_files):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pz24"
    formula = "mul(abs(mul(W,W)), mms(G))"
    assert main([*base_args, "--metric", formula, "--pattern", "2:4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(), parse_constant=_refuse)
    assert report["metric"]["functional"] == "mul(abs(mul(W, W)), mms(G))"
    assert {"infix", "latex", "sympy"} <= set(report["metric"])
    assert report["pattern"] == "2:4" and report["sparsity"]["overall"] == 0.5
    assert report["model"]["path"] == str(tiny_llama_dir)
    assert len(report["sparsity"]["per_layer"]) == 14
    ppl = report["perplexity"]
    dataset = str(text_files["test"])
    assert ppl["dense"][dataset] > 1 and ppl["pruned"][dataset] > 1
    assert ppl["dense"][dataset] != ppl["pruned"][dataset]
    assert report["provenance"]["command"] and report["provenance"]["versions"]["torch"]
    assert {"load_model", "stats", "prune", "pruned_eval"} <= set(report["timings_s"])

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, frac in report["sparsity"]["per_layer"].items():
        weight = reloaded.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(frac * weight.numel())
    # the same pruning done in memory gives identical logits to the reloaded model
    spec = EvaluatorSpec(model=str(tiny_llama_dir), calib=str(text_files["calib"]), n_calib=4, seqlen=32)
    setup = PruningSetup.from_spec(spec)
    setup.prune(resolve_metric(formula), NM(2, 4), "oneshot")
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(setup.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_apply_metric_file_and_sequential(tmp_path, base_args):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"formula": "abs(W) * sqrt(X)"}))
    out = tmp_path / "seq"
    assert main([*base_args, "--metric-file", str(best), "--mode", "sequential", "--sparsity", "0.6",
                 "--out", str(out), "--no-save-model", "--no-dense-eval"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "sequential" and report["metric"]["source"] == str(best)
    assert abs(report["sparsity"]["overall"] - 0.6) < 0.01
    assert not (out / "config.json").exists() and report["perplexity"]["dense"] == {}


@pytest.mark.parametrize("extra,message", [
    (["--metric", "mul(abs(W), foo(X))"], "foo"),
    (["--metric", "__import__('os').system('true')"], "unexpected character \"'\" at column 12"),
    (["--metric", "wanda", "--sparsity", "1.5"], "between 0 and 1"),
    (["--metric", "wanda", "--pattern", "4:2"], "0 < N < M"),
    (["--metric", "wanda", "--pattern", "2:4", "--sparsity", "0.7"], "pattern 2:4 fixes sparsity at 0.5"),
    (["--metric", "wanda", "--n-calib", "0"], "--n-calib must be at least 1"),
    (["--metric", "wanda", "--model", "/no/such/model"], "not found"),
    (["--metric", "wanda", "--calib", "/no/such/text.txt"], "neither a known dataset"),
    (["--metric", "wanda", "--dataset", "wikitext2:validation"], "report"),
    (["--metric", "wanda", "--calib", "wikitext2:test"], "reserved for reports"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, base_args, capsys, extra, message):
    out = tmp_path / "out"
    args = list(base_args)
    for flag in ("--model", "--calib", "--dataset"):  # a bad value given in `extra` wins
        if flag in extra and flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    assert main([*args, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not out.exists() and not (tmp_path / ".out.tmp").exists()


def test_existing_out_needs_overwrite(tmp_path, base_args, capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert main([*base_args, "--metric", "wanda", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "precious"


def test_cli_help_and_exit_code():
    run = subprocess.run([sys.executable, "-m", "metricgp.apply", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--metric-file" in run.stdout and "wanda" in run.stdout
    run = subprocess.run([sys.executable, "-m", "metricgp.apply", "--metric", "wanda", "--sparsity", "2",
                          "--out", "/tmp/never-written-metricgp"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
