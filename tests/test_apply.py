"""`python -m metricgp.apply` end to end on a tiny saved model, and its user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import metricgp
from metricgp.cli.apply import main
from metricgp.evaluate import EvaluatorSpec, PruningSetup
from metricgp.expr import resolve_metric
from metricgp.models import prunable_layers
from metricgp.prune.patterns import NM, parse_pattern


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
    (["--metric", "wanda", "--recover-tokens", "64", "--recover-loss", "mse"], "unknown --recover-loss 'mse'"),
    (["--metric", "wanda", "--recover-tokens", "64", "--recover-schedule", "step"], "unknown --recover-schedule"),
    (["--metric", "wanda", "--recover-tokens", "64", "--recover-method", "group-lora"], "cannot keep the zeros"),
    (["--metric", "wanda", "--recover-tokens", "-1"], "--recover-tokens must be >= 0"),
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


@pytest.mark.parametrize("pattern,method", [(["--sparsity", "0.5"], "full"), (["--pattern", "2:4"], "lora")])
def test_recovery_keeps_every_zero_through_save_and_reload(tmp_path, base_args, tiny_llama_dir, text_files, pattern,
                                                           method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "rec"
    assert main([*base_args, "--metric", "wanda", *pattern, "--recover-tokens", "96", "--recover-method", method,
                 "--recover-lr", "1e-2", "--recover-loss", "ce+kd", "--recover-schedule", "cosine",
                 "--recover-warmup", "0.3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(), parse_constant=_refuse)
    rec = report["recovery"]
    assert rec["method"] == method and rec["loss"] == "ce+kd" and rec["steps"] == 3 and rec["warmup_steps"] == 1
    assert rec["split"] == "file" and rec["masked_layers"] == 14 and rec["tokens_per_second"] > 0
    assert rec["sparsity_after"] == report["sparsity"]["overall"]
    dataset = str(text_files["test"])
    assert report["perplexity"]["recovered"][dataset] != report["perplexity"]["pruned"][dataset]
    # the pruning done again in memory: the saved, recovered model has exactly its zeros, other weights
    spec = EvaluatorSpec(model=str(tiny_llama_dir), calib=str(text_files["calib"]), n_calib=4, seqlen=32)
    setup = PruningSetup.from_spec(spec)
    setup.prune(resolve_metric("wanda"), parse_pattern(pattern[1] if pattern[0] == "--pattern" else "unstructured",
                                                       0.5 if pattern[0] == "--sparsity" else None), "oneshot")
    ids = torch.randint(0, 200, (2, 16))
    loaded = metricgp.load_pruned(out)
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, stock(input_ids=ids).logits)
    for name, layer in prunable_layers(loaded).items():
        pruned = setup.layers[name].weight
        assert torch.equal(layer.weight == 0, pruned == 0), name
        assert not torch.equal(layer.weight, pruned), name


def test_kd_recovery_needs_no_other_flag(tmp_path, base_args):
    out = tmp_path / "kd"
    assert main([*base_args, "--metric", "wanda", "--recover-tokens", "64", "--recover-loss", "kd",
                 "--no-save-model", "--out", str(out)]) == 0
    rec = json.loads((out / "report.json").read_text())["recovery"]
    assert rec["loss"] == "kd" and rec["method"] == "lora" and rec["lr"] == 1e-4 and len(rec["losses"]) == 2
