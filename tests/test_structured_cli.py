"""`python -m metricgp.apply --structured` end to end on a tiny saved model, and its user errors."""

from __future__ import annotations

import json

import pytest
import torch

import metricgp
from metricgp.cli.apply import main


@pytest.fixture()
def base_args(tiny_llama_dir, text_files, isolated_cache):
    return ["--structured", "--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4",
            "--seqlen", "32", "--dataset", str(text_files["test"]), "--eval-windows", "4"]


def test_structured_apply_writes_a_smaller_reloadable_model(tmp_path, base_args, text_files):
    import metricgp

    out = tmp_path / "s70"
    assert main([*base_args, "--metric", "wanda", "--keep", "0.7", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    size = report["size"]
    assert size["decoder_params"]["pruned"] < size["decoder_params"]["dense"]
    assert size["achieved_keep"] == size["decoder_params"]["pruned"] / size["decoder_params"]["dense"]
    assert abs(size["achieved_keep"] - 0.7) < 0.05
    assert report["structured"]["keep"] == 0.7 and report["metric"]["functional"] == "mul(abs(W), sqrt(X))"
    model = metricgp.load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == size["params"]["pruned"]
    dataset = str(text_files["test"])
    assert report["perplexity"]["pruned"][dataset] > 1


def test_structured_methods_and_depth(tmp_path, base_args):
    out = tmp_path / "flap"
    assert main([*base_args, "--method", "flap", "--keep", "0.8", "--out", str(out), "--no-save-model"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["structured"]["importance"] == "flap" and report["structured"]["bias_compensation"]
    out = tmp_path / "depth"
    assert main([*base_args, "--method", "shortgpt", "--keep", "0.5", "--out", str(out), "--no-save-model"]) == 0
    size = json.loads((out / "report.json").read_text())["size"]
    assert len(size["removed_blocks"]) == 1 and len(size["block_scores"]) == 2  # the tiny model has 2 blocks
    assert size["removed_blocks"][0] == min(range(2), key=lambda i: size["block_scores"][i])
    assert size["achieved_keep"] == 0.5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metric", "wanda", "--keep", "1.5"], "--keep must be in (0, 1]"),
        (["--metric", "wanda", "--keep", "0"], "--keep must be in (0, 1]"),
        (["--metric", "wanda", "--allocation", "sideways"], "unknown allocation 'sideways'"),
        (["--metric", "wanda", "--keep-map", "KEEPMAP"], "keep map names unknown module(s) model.layers.7.mlp"),
        (["--keep", "0.7"], "importance 'metric' needs --metric or --metric-file"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--metric", "wanda", "--refit", "--bias-compensation"], "--refit and --bias-compensation"),
        (["--metric", "wanda", "--reduction", "median"], "unknown reduction 'median'"),
    ],
)
def test_structured_user_errors(tmp_path, base_args, capsys, extra, message):
    keep_map = tmp_path / "map.json"
    keep_map.write_text(json.dumps({"model.layers.7.mlp": 0.5}))
    extra = [str(keep_map) if e == "KEEPMAP" else e for e in extra]
    out = tmp_path / "out"
    assert main([*base_args, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "level-search-best-json"])
def test_keep_map_drives_the_pruning(tmp_path, base_args, wrapped):
    keep_map = tmp_path / "map.json"
    fractions = {"model.layers.0.mlp": 0.5, "model.layers.1.self_attn": 0.5}
    # a level search's best.json carries the winner's map beside its genome
    keep_map.write_text(json.dumps({"genome": [0, 2], "kept": 0.8, "keep_map": fractions} if wrapped else fractions))
    out = tmp_path / "km"
    assert main([*base_args, "--metric", "magnitude", "--keep-map", str(keep_map), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    removed = report["size"]["removed_units"]
    assert removed["model.layers.0.mlp"]["elements"] == 32  # half of 64 channels
    assert removed["model.layers.1.self_attn"]["elements"] == 2  # one query head of each KV group
    assert set(removed) == {"model.layers.0.mlp", "model.layers.1.self_attn"}
    assert report["per_layer"] == {"0": {"intermediate_size": 32}, "1": {"num_attention_heads": 2}}


def test_speed_check_measures_and_reloads_identically(tmp_path, tiny_llama_dir, text_files, isolated_cache):
    from metricgp.experiments.structured import main as experiments_main

    assert experiments_main(["speed", "--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]),
                             "--n-calib", "4", "--seqlen", "32", "--keep", "0.7", "--prompt-lens", "16",
                             "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    (speed,) = result["speed"]
    assert speed["flops_ratio"] > 1 and speed["param_ratio"] > 1
    assert speed["prefill_speedup"] > 0 and speed["decode_speedup"] > 0
    assert result["reload"] == {"load_pruned_max_abs_diff": 0.0, "auto_from_pretrained_fresh_process_max_abs_diff": 0.0}


def test_refit_fits_the_first_pruned_modules_dense_output_better_and_reloads(tmp_path, base_args, tiny_llama_dir,
                                                                            text_files):
    """Same units removed; the first pruned module (whose input is still the dense one) is closer to dense."""
    import metricgp
    from metricgp.evaluate import EvaluatorSpec, PruningSetup
    from metricgp.structured.evaluator import StructuredPruner, StructuredSpec

    setup = PruningSetup.from_spec(EvaluatorSpec(model=str(tiny_llama_dir), calib=str(text_files["calib"]),
                                                 n_calib=4, seqlen=32))
    pruner = StructuredPruner(setup)
    spec = StructuredSpec(keep=0.6)
    removed = pruner.plan(pruner.score(metricgp.expr.resolve_metric("wanda"), spec), spec)
    outs = {m.slices[-1].linear for m in pruner.modules if any(u.module == m.name for u in removed)}
    assert outs

    def outputs(model) -> dict:
        got: dict = {}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n: got.setdefault(n, []).append(o.detach())) for n in outs]
        with torch.no_grad():
            for w in setup.calib:
                model(input_ids=w[None])
        for h in hooks:
            h.remove()
        return {n: torch.cat(v) for n, v in got.items()}

    dense = outputs(setup.model)  # (the inputs differ once earlier blocks are pruned: compare block by block)
    plain = outputs(pruner.build(removed, spec))
    refit = outputs(pruner.build(removed, StructuredSpec(keep=0.6, refit=True)))
    first = min(outs, key=lambda n: int(n.split(".")[2]))  # its input is still the dense model's
    err = {k: float((v[first] - dense[first]).square().mean()) for k, v in (("plain", plain), ("refit", refit))}
    assert err["refit"] < err["plain"]
    out = tmp_path / "r60"
    assert main([*base_args, "--metric", "wanda", "--keep", "0.6", "--refit", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["structured"]["refit"] is True
    again = metricgp.load_pruned(out)
    with torch.no_grad():
        ids = setup.calib[:1]
        assert torch.allclose(again(input_ids=ids).logits, pruner.build(removed, StructuredSpec(
            keep=0.6, refit=True))(input_ids=ids).logits, atol=1e-5)


def test_structured_kd_recovery_reloads_with_identical_logits(tmp_path, base_args, text_files):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "s70kd"
    assert main([*base_args, "--metric", "wanda", "--keep", "0.7", "--recover-tokens", "64", "--recover-loss", "kd",
                 "--recover-method", "full", "--recover-lr", "1e-3", "--recover-checkpointing", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["loss"] == "kd" and report["recovery"]["method"] == "full"
    assert report["recovery"]["checkpointing"] is True
    assert report["recovery"]["split"] == "file"  # a user file is what they said it is for; never a test split
    dataset = str(text_files["test"])
    assert report["perplexity"]["recovered"][dataset] != report["perplexity"]["pruned"][dataset]
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        a = metricgp.load_pruned(out)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    assert torch.equal(a, b)


def test_a_bad_recovery_loss_is_one_line_and_writes_nothing(tmp_path, base_args, capsys):
    out = tmp_path / "bad"
    assert main([*base_args, "--metric", "wanda", "--recover-tokens", "64", "--recover-loss", "kl",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--recover-loss 'kl'" in err
    assert not out.exists() and not (tmp_path / ".bad.tmp").exists()


@pytest.mark.parametrize("options", [
    {"refit": True},
    {"importance": "flap", "bias_compensation": True, "keep": 0.8},
    {"allocation": "uniform", "head_mode": "kv-group"},
    {"structures": "depth", "importance": "shortgpt", "keep": 0.5},
])
def test_shrinking_in_place_gives_the_copy_and_frees_the_dense_linears(tiny_llama_dir, text_files, isolated_cache,
                                                                       options):
    """`prune(..., in_place=True)` (what `apply --structured` does): the same model and report as the copy,
    the setup's model itself shrunk, its replaced linears freed and its dense copy released."""
    import gc
    import weakref

    from metricgp.errors import MetricGPError
    from metricgp.evaluate import EvaluatorSpec, PruningSetup
    from metricgp.models import prunable_layers
    from metricgp.structured.evaluator import StructuredSpec, prune

    spec = StructuredSpec(**{"keep": 0.6, **options})
    tree = metricgp.expr.resolve_metric("wanda")
    setups = [PruningSetup.from_spec(EvaluatorSpec(model=str(tiny_llama_dir), calib=str(text_files["calib"]),
                                                   n_calib=4, seqlen=32)) for _ in range(2)]
    dense_params = setups[0].model.num_parameters()
    copy, copy_report = prune(setups[0], tree, spec)
    dense_linears = [weakref.ref(m) for m in setups[1].layers.values()]
    shrunk, report = prune(setups[1], tree, spec, in_place=True)
    assert report == copy_report and setups[0].model.num_parameters() == dense_params  # the copy left it dense
    assert shrunk is setups[1].model and shrunk.num_parameters() == copy.num_parameters() < dense_params
    assert copy.state_dict().keys() == shrunk.state_dict().keys()
    assert all(torch.equal(v, shrunk.state_dict()[k]) for k, v in copy.state_dict().items())
    with torch.no_grad():
        assert torch.equal(copy(input_ids=setups[1].calib[:2]).logits, shrunk(input_ids=setups[1].calib[:2]).logits)
    layers = prunable_layers(shrunk)
    assert setups[1].layers.keys() == layers.keys() and all(setups[1].layers[n] is m for n, m in layers.items())
    gc.collect()
    assert sum(ref() is None for ref in dense_linears) >= 2  # the replaced dense linears were freed
    assert all(ref() is None or ref() in layers.values() for ref in dense_linears)
    with pytest.raises(MetricGPError, match="shrunk in place"):
        setups[1].dense.restore()


def test_apply_structured_shrinks_in_place_unless_speed_needs_the_dense_model(tmp_path, base_args, monkeypatch):
    from metricgp.cli import structured

    calls = []

    def recording(setup, tree, spec, in_place=False):
        calls.append(in_place)
        return prune(setup, tree, spec, in_place=in_place)

    prune = structured.prune
    monkeypatch.setattr(structured, "prune", recording)
    for extra in ([], ["--speed"]):
        assert main([*base_args, "--metric", "wanda", "--keep", "0.7", "--no-save-model", "--out",
                     str(tmp_path / f"s{len(calls)}"), *extra]) == 0
    assert calls == [True, False]
