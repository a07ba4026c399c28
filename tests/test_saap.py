"""SAAP: uncertainty fusion of estimators, the stability keep map against the global target, group
fine-tuning merged back, and the command line. Tiny models only."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_tokenizer
from structured_models import family_model

from metricgp.apply import main
from metricgp.errors import MetricGPError
from metricgp.evaluate import EvaluatorSpec, PruningSetup
from metricgp.structured.evaluator import StructuredPruner, StructuredSpec, per_layer_sizes, prune
from metricgp.structured.groups import decoder_params, discover, linears_by_name
from metricgp.structured.importance import REDUCTIONS, module_partial
from metricgp.structured.recover import recover
from metricgp.structured.saap import FUSIONS, SAAPOptions, learn_log_sigma, normalised
from metricgp.structured.saap_estimators import compute_batch_scores, parse_estimators, split_estimators
from metricgp.structured.saap_group import GroupLoRALinear, group_lora_params, matched_lora_rank

# ---------------------------------------------------------------- fusion


def _synthetic(noise: tuple[float, ...], batches: int = 16, n: int = 60) -> torch.Tensor:
    """(K, B, N) importances: one true importance per structure plus per-batch noise of each scale."""
    gen = torch.Generator().manual_seed(0)
    true = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    return torch.stack([true + s * torch.randn(batches, n, generator=gen, dtype=torch.float64) for s in noise])


def test_noisy_estimator_gets_a_larger_sigma_and_less_weight():
    importance = _synthetic((0.05, 0.5))
    importance = torch.cat([importance, importance[:1]])  # the third is the first, exactly
    fusion = FUSIONS["uncertainty"](importance)
    assert fusion.sigma[1] > fusion.sigma[0] and fusion.weights[1] < fusion.weights[0]
    assert fusion.weights[0] == fusion.weights[2] and fusion.sigma[0] == fusion.sigma[2]
    # the weights are inverse variances: noise x10 -> variance x100 (up to the true signal's share)
    assert 50 < float(fusion.weights[0] / fusion.weights[1]) < 150


def test_two_identical_estimators_get_equal_weight_after_normalisation():
    scores = _synthetic((0.2,)).repeat(2, 1, 1) * torch.tensor([1.0, 1e3]).view(2, 1, 1)  # scale must not matter
    importance = normalised(scores, torch.ones(scores.shape[2], dtype=torch.float64), ["a", "b"])
    fusion = FUSIONS["uncertainty"](importance)
    assert torch.allclose(fusion.weights[0], fusion.weights[1], rtol=1e-9)


def test_sigma_is_learned_to_the_closed_form():
    loss = torch.tensor([1e-3, 0.3, 5.0], dtype=torch.float64)
    assert torch.allclose(torch.exp(2 * learn_log_sigma(loss)), loss, rtol=1e-6)


def test_a_batch_independent_estimator_is_floored_at_the_steadiest_one():
    importance = _synthetic((0.05, 0.3, 0.0))  # the third never changes (as magnitude)
    fusion = FUSIONS["uncertainty"](importance)
    assert fusion.inconsistency[2] == 0 and torch.isfinite(fusion.weights).all()
    assert torch.allclose(fusion.weights[2], fusion.weights[0], rtol=1e-6)
    assert torch.allclose(fusion.sigma.square(), fusion.inconsistency.clamp_min(fusion.inconsistency[0]), rtol=1e-6)


def test_estimator_parsing():
    assert split_estimators("taylor-element,mul(abs(W), sqrt(X)),wanda") == [
        "taylor-element", "mul(abs(W), sqrt(X))", "wanda"]
    assert [e.signed for e in parse_estimators(["taylor-vector", "taylor-element", "abs(W) * G"])] == [
        True, False, False]
    with pytest.raises(MetricGPError, match="unknown estimator 'nope'"):
        parse_estimators(["nope"])
    with pytest.raises(MetricGPError, match="metric file not found"):
        parse_estimators(["missing/best.json"])
    with pytest.raises(MetricGPError, match="given twice"):
        parse_estimators(["wanda", "wanda"])
    with pytest.raises(MetricGPError, match="spread"):
        SAAPOptions.from_dict({"spread": 2.0})


# ---------------------------------------------------------------- per-batch scores and the keep map


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory, text_files):
    """Four blocks, so that skipping the edge blocks leaves two to prune."""
    path = tmp_path_factory.mktemp("deep-llama")
    tokenizer = train_tokenizer(text_files["calib"].read_text())
    family_model("llama", vocab=len(tokenizer), layers=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def setup(deep_llama_dir, text_files, isolated_cache):
    spec = EvaluatorSpec(model=str(deep_llama_dir), calib=str(text_files["calib"]), valid=str(text_files["valid"]),
                         n_calib=4, seqlen=32)
    return PruningSetup.from_spec(spec, grads=False)


def test_per_batch_scores_are_per_window_structure_sums(setup):
    model = setup.model
    modules, linears = discover(model), linears_by_name(model)
    estimators = parse_estimators(["magnitude", "taylor-element", "taylor-vector"])
    flags = [p.requires_grad for p in model.parameters()]
    scores = compute_batch_scores(model, modules, linears, setup.calib, estimators)
    n = sum(m.n_elements + m.n_kv for m in modules)
    assert scores.shape == (3, 4, n) and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    m = modules[1]  # block 0's MLP
    part = module_partial(m, {s.linear: linears[s.linear].weight.detach().abs() for s in m.slices}, REDUCTIONS["sum"])
    start = modules[0].n_elements + modules[0].n_kv
    assert torch.allclose(scores[0, :, start:start + m.n_elements], part.value.expand(4, -1))
    assert (scores[2] <= scores[1] * (1 + 1e-5) + 1e-9).all()  # |sum W g| <= sum |W g|
    assert (scores[1] > 0).all()


def test_scores_are_cached_per_estimator_and_only_missing_ones_computed(setup, monkeypatch):
    from metricgp.structured import saap_estimators

    modules, linears = discover(setup.model), linears_by_name(setup.model)
    calls = []
    real = saap_estimators.compute_batch_scores

    def counting(model, mods, lins, calib, estimators):
        calls.append([e.name for e in estimators])
        return real(model, mods, lins, calib, estimators)

    monkeypatch.setattr(saap_estimators, "compute_batch_scores", counting)
    pair, cached = saap_estimators.cached_batch_scores(setup, modules, linears,
                                                       parse_estimators(["magnitude", "taylor-element"]))
    assert not cached and calls == [["magnitude", "taylor-element"]]
    one, cached = saap_estimators.cached_batch_scores(setup, modules, linears, parse_estimators(["taylor-element"]))
    assert cached and calls == [["magnitude", "taylor-element"]] and torch.equal(one[0], pair[1])
    three, cached = saap_estimators.cached_batch_scores(
        setup, modules, linears, parse_estimators(["taylor-element", "wanda", "magnitude"]))
    assert not cached and calls[-1] == ["wanda"]  # only the new estimator is computed
    assert torch.equal(three[0], pair[1]) and torch.equal(three[2], pair[0])


def test_stability_keep_map_meets_the_global_target(setup):
    dense = decoder_params(setup.model)
    for keep in (0.7, 0.5):
        spec = StructuredSpec(keep=keep, importance="saap", allocation="stability", options={"spread": 0.5})
        pruner = StructuredPruner(setup)
        units = pruner.score(None, spec)
        model, sizes = prune(setup, None, spec)
        target = round(keep * dense)
        kept = decoder_params(model)
        assert 0 <= kept - target < max(u.params for u in units), (keep, kept, target)
        assert sizes["decoder_params"]["pruned"] == kept
        modules = sizes["saap"]["modules"]
        assert len({round(m["keep"], 6) for m in modules.values()}) > 1  # non-uniform ratios
        assert set(sizes["saap"]["fusion"]) == {"taylor-element", "taylor-vector", "magnitude", "wanda"}
    assert sizes["saap"]["scores_cached"]  # the second keep level reused the per-batch scores from disk


def test_skip_edge_blocks_leaves_the_first_and_last_blocks_whole(setup):
    spec = StructuredSpec(keep=0.7, importance="saap", allocation="stability", options={"skip_edge_blocks": True})
    model, sizes = prune(setup, None, spec)
    assert set(per_layer_sizes(model)) <= {1, 2} and per_layer_sizes(model)
    assert {int(name.split(".")[2]) for name in sizes["saap"]["modules"]} == {1, 2}
    kept, target = decoder_params(model), round(0.7 * decoder_params(setup.model))
    assert 0 <= kept - target < 2 * 32 * 8 + 32 * 3  # within one unit (the largest: a head of each KV group)


def test_saap_importance_with_a_plain_allocation(setup):
    spec = StructuredSpec(keep=0.7, importance="saap")  # the fused importance, ranked globally
    sizes = prune(setup, None, spec)[1]
    assert "modules" not in sizes["saap"] and abs(sizes["achieved_keep"] - 0.7) < 0.05
    fusion = sizes["saap"]["fusion"]
    assert fusion["taylor-vector"]["sigma"] >= fusion["taylor-element"]["sigma"]  # signed sums fluctuate more
    for f in fusion.values():
        assert f["sigma"] ** 2 == pytest.approx(max(f["inconsistency"], min(
            g["inconsistency"] for g in fusion.values() if g["inconsistency"] > 0)), rel=1e-5)


# ---------------------------------------------------------------- group fine-tuning


def _structure(model) -> dict[str, tuple]:
    return {n: (type(m), tuple(p.shape for p in m.parameters(recurse=False))) for n, m in model.named_modules()}


def _windows(n: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def test_group_finetuning_at_zero_adapters_merges_to_the_same_model():
    model = family_model("llama")
    before, ids = _structure(model), _windows()
    logits = _logits(model, ids)
    report = recover(model, ids, method="group-lora", tokens=32, lr=0.0, groups=3, progress=False)
    assert _structure(model) == before and torch.equal(_logits(model, ids), logits)
    layers = {n: m for n, m in linears_by_name(model).items() if "layers" in n}
    assert report.trainable_params == group_lora_params(layers, 3, 8)


def test_group_finetuning_trains_and_leaves_no_adapters():
    model = family_model("llama")
    before, ids = _structure(model), _windows()
    logits = _logits(model, ids)
    report = recover(model, ids, method="group-lora", tokens=8 * 16, lr=1e-2, groups=4, progress=False)
    assert _structure(model) == before and not torch.equal(_logits(model, ids), logits)
    assert not any(isinstance(m, GroupLoRALinear) for m in model.modules())
    assert report.losses[-1] < report.losses[0]


def test_group_adapter_equals_its_merged_weight_on_uneven_groups():
    base = torch.nn.Linear(23, 7)
    wrapped = GroupLoRALinear(base, groups=5, rank=2, alpha=4)
    assert [hi - lo for lo, hi in wrapped.bounds] == [5, 5, 5, 4, 4]
    with torch.no_grad():
        for b in wrapped.B:
            b.normal_()
    x = torch.randn(3, 23)
    merged = torch.nn.functional.linear(x, base.weight + wrapped.delta(), base.bias)
    assert torch.allclose(wrapped(x), merged, atol=1e-5)


def test_matched_lora_rank_has_about_the_same_trainable_parameters():
    layers = {n: m for n, m in linears_by_name(family_model("llama")).items() if "layers" in n}
    r = matched_lora_rank(layers, groups=4, rank=8)
    per_rank = sum(m.in_features + m.out_features for m in layers.values())
    assert abs(r * per_rank - group_lora_params(layers, 4, 8)) <= per_rank / 2 and r > 8


# ---------------------------------------------------------------- command line


@pytest.fixture()
def base_args(tiny_llama_dir, text_files, isolated_cache):
    return ["--structured", "--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4",
            "--seqlen", "32", "--dataset", str(text_files["test"]), "--eval-windows", "4"]


def test_saap_command_lines(tmp_path, base_args):
    import metricgp

    out = tmp_path / "saap70"
    assert main([*base_args, "--importance", "saap", "--keep", "0.7", "--out", str(out), "--no-save-model"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["structured"]["allocation"] == "stability" and abs(report["size"]["achieved_keep"] - 0.7) < 0.05
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"formula": "mul(abs(W), G)"}))
    out = tmp_path / "saap70ft"
    estimators = f"taylor-element,taylor-vector,magnitude,wanda,{best}"
    assert main([*base_args, "--importance", "saap", "--estimators", estimators, "--keep", "0.7",
                 "--group-finetune-tokens", "64", "--compare-lora", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["structured"]["options"]["estimators"] == split_estimators(estimators)
    assert len(report["size"]["saap"]["fusion"]) == 5
    assert report["recovery"]["method"] == "group-lora" and report["recovery"]["tokens"] == 64
    assert report["recovery_comparison"]["lora_rank"] > 8 and report["recovery_comparison"]["perplexity"]
    model = metricgp.load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == report["size"]["params"]["pruned"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--importance", "saap", "--estimators", "nope"], "unknown estimator 'nope'"),
        (["--importance", "saap", "--estimators", "wanda,missing.json"], "metric file not found"),
        (["--metric", "wanda", "--estimators", "wanda"], "need --importance saap"),
        (["--importance", "saap", "--metric", "wanda"], "takes metric formulas in --estimators"),
        (["--importance", "saap", "--compare-lora"], "--compare-lora compares group fine-tuning"),
        (["--importance", "saap", "--recover-tokens", "8", "--group-finetune-tokens", "8"], "not both"),
        (["--importance", "saap", "--saap-spread", "-1"], "spread must be in [0, 1]"),
        (["--importance", "saap", "--allocation", "global", "--skip-edge-blocks"], "not 'global'"),
        (["--importance", "saap", "--recover-tokens", "8", "--recover-method", "qlora"], "unknown recovery method"),
    ],
)
def test_saap_user_errors(tmp_path, base_args, capsys, extra, message):
    out = tmp_path / "out"
    assert main([*base_args, *extra, "--keep", "0.7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_less_important_more_stable_modules_are_pruned_more():
    from metricgp.structured.importance import Unit
    from metricgp.structured.saap_search import propensities, water_fill

    importance = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    stability = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    pi = propensities(importance, stability, spread=0.5)
    assert pi.tolist() == [1.5, 1.0, 0.5]
    units = [Unit(m, "channel", (i,), (), 10, 0.0) for m in "abc" for i in range(100)]
    removed = water_fill(units, 600, dict(zip("abc", pi.tolist(), strict=True)))
    assert removed == {"a": 30, "b": 20, "c": 10}  # fractions in proportion to pi, 600 params exactly
