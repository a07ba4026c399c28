"""SAAP: uncertainty fusion of estimators, the stability keep map against the global target, group
fine-tuning merged back, and the command line. Tiny models only."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_tokenizer
from structured_models import family_model

from metricgp.cli.apply import main
from metricgp.errors import MetricGPError
from metricgp.evaluate import EvaluatorSpec, PruningSetup
from metricgp.ranking import spearman
from metricgp.structured.evaluator import StructuredPruner, StructuredSpec, per_layer_sizes, prune
from metricgp.structured.groups import decoder_params, discover, linears_by_name
from metricgp.structured.importance import REDUCTIONS, module_partial
from metricgp.structured.recover import recover
from metricgp.structured.saap import (
    FUSIONS,
    FusionInput,
    SAAPOptions,
    learn_log_sigma,
    normalised,
    rank_error,
)
from metricgp.structured.saap.estimators import compute_batch_scores, parse_estimators, split_estimators
from metricgp.structured.saap.group import GroupLoRALinear, group_lora_params, matched_lora_rank
from metricgp.structured.saap.probes import choose_probes, measure_probes

# ---------------------------------------------------------------- fusion


def _synthetic(noise: tuple[float, ...], batches: int = 16, n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, B, N) importances: one true importance per structure plus per-batch noise of each scale;
    and the truth."""
    gen = torch.Generator().manual_seed(0)
    true = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    noisy = [true + s * torch.randn(batches, n, generator=gen, dtype=torch.float64) for s in noise]
    return torch.stack(noisy), true


def _measured(importance: torch.Tensor, true: torch.Tensor) -> FusionInput:
    """Every structure is its own probe, measured at its true importance."""
    return FusionInput(importance, importance, true)


def _fuse(name: str, x: FusionInput):
    return FUSIONS[name].fn(x)


def test_noisy_estimator_gets_a_larger_sigma_and_less_weight():
    importance, true = _synthetic((0.05, 0.5))
    importance = torch.cat([importance, importance[:1]])  # the third is the first, exactly
    for name in ("uncertainty", "consistency"):
        fusion = _fuse(name, _measured(importance, true))
        assert fusion.sigma[1] > fusion.sigma[0] and fusion.weights[1] < fusion.weights[0], name
        assert fusion.weights[0] == fusion.weights[2] and fusion.sigma[0] == fusion.sigma[2], name
    # consistency: the weights are inverse variances, noise x10 -> variance x100
    fusion = _fuse("consistency", _measured(importance, true))
    assert 50 < float(fusion.weights[0] / fusion.weights[1]) < 150


def test_two_identical_estimators_get_equal_weight_after_normalisation():
    scores, true = _synthetic((0.2,))
    scores = scores.repeat(2, 1, 1) * torch.tensor([1.0, 1e3]).view(2, 1, 1)  # scale must not matter
    importance = normalised(scores, torch.ones(scores.shape[2], dtype=torch.float64), ["a", "b"])
    for name in FUSIONS:
        fusion = _fuse(name, _measured(importance, true))
        assert torch.allclose(fusion.weights[0], fusion.weights[1], rtol=1e-9), name


def test_sigma_is_learned_to_the_closed_form():
    loss = torch.tensor([1e-3, 0.3, 5.0], dtype=torch.float64)
    assert torch.allclose(torch.exp(2 * learn_log_sigma(loss)), loss, rtol=1e-6)


def test_a_steady_but_wrong_estimator_gets_the_least_weight_only_when_checked_against_measurement():
    """The defect of fusing by consistency alone: magnitude never changes across windows, so it got
    the largest weight however badly it ranks structures."""
    importance, true = _synthetic((0.05, 0.3))
    wrong = torch.rand(importance.shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    importance = torch.cat([importance, wrong.expand(1, importance.shape[1], -1)])  # steady, unrelated to truth
    checked = _fuse("uncertainty", _measured(importance, true))
    assert checked.weights[2] < checked.weights[1] < checked.weights[0]
    assert checked.inconsistency[2] == 0 and checked.loss[2] > 0.1  # about 1/6, a random ranking's error
    steady = _fuse("consistency", _measured(importance, true))
    assert steady.weights[2] == steady.weights.max()  # floored at the steadiest: as trusted as the best


def test_spearman_of_ranks():
    x = list(range(10))
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert abs(spearman(x, [3.0, 9, 0, 7, 1, 8, 2, 6, 4, 5])) < 0.3


def test_rank_error_is_zero_for_the_true_order_and_about_a_sixth_for_a_random_one():
    true = torch.rand(400, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    perfect = (2 * true + 1).view(1, 1, -1)  # any increasing transform: ranks are what count
    shuffled = true[torch.randperm(400, generator=torch.Generator().manual_seed(3))].view(1, 1, -1)
    assert float(rank_error(perfect, true)) == 0.0
    assert abs(float(rank_error(shuffled, true)) - 1 / 6) < 0.03
    assert float(rank_error(-perfect, true)) > 0.3  # reversed: far worse than random


def test_a_batch_independent_estimator_is_floored_at_the_steadiest_one():
    importance, true = _synthetic((0.05, 0.3, 0.0))  # the third never changes (as magnitude)
    fusion = _fuse("consistency", _measured(importance, true))
    assert fusion.inconsistency[2] == 0 and torch.isfinite(fusion.weights).all()
    assert torch.allclose(fusion.weights[2], fusion.weights[0], rtol=1e-6)
    assert torch.allclose(fusion.sigma.square(), fusion.loss.clamp_min(fusion.loss[0]), rtol=1e-6)


def test_the_uncertainty_fusion_refuses_to_run_without_measurements():
    importance, _ = _synthetic((0.1,))
    with pytest.raises(MetricGPError, match="measured probes"):
        _fuse("uncertainty", FusionInput(importance))


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
    from metricgp.structured.saap import estimators as saap_estimators

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


def test_probes_are_head_sized_disjoint_and_indexed_like_the_estimators(setup):
    modules, linears = discover(setup.model), linears_by_name(setup.model)
    probes = choose_probes(modules, linears, per_module=2, seed=0)
    assert len(probes) == 2 * len(modules)
    start = 0
    for m in modules:
        mine = [p for p in probes if p.module == m.name]
        assert not set(mine[0].members) & set(mine[1].members)
        for p in mine:
            assert p.layout == tuple(start + j for j in p.members)
            if m.kind == "mlp":
                head = next(o for o in modules if o.block == m.block and o.kind == "attention")
                params = len(p.members) * m.element_params(linears)
                assert abs(params - head.element_params(linears)) <= m.element_params(linears) / 2
            else:
                assert len(p.members) == 1
        start += m.n_elements + m.n_kv
    assert choose_probes(modules, linears, 2, seed=0) == probes != choose_probes(modules, linears, 2, seed=1)


def test_a_probe_costs_what_physically_removing_its_channels_costs_and_the_weights_come_back(setup):
    import copy

    model, modules, linears = setup.model, discover(setup.model), linears_by_name(setup.model)
    probes = [p for p in choose_probes(modules, linears) if "mlp" in p.module][:2]
    windows = setup.fitness_windows(2)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    deltas = measure_probes(model, modules, linears, probes, windows, progress=False)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    dense = _mean_loss(model, windows)
    for p, delta in zip(probes, deltas.tolist(), strict=True):
        shrunk = copy.deepcopy(model)
        mlp = shrunk.get_submodule(p.module)
        keep = torch.tensor([i for i in range(mlp.up_proj.out_features) if i not in p.members])
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, len(keep), bias=False)
            new.weight.data = old.weight.data[keep].clone()
            setattr(mlp, name, new)
        down = torch.nn.Linear(len(keep), mlp.down_proj.out_features, bias=False)
        down.weight.data = mlp.down_proj.weight.data[:, keep].clone()
        mlp.down_proj = down
        assert delta == pytest.approx(_mean_loss(shrunk, windows) - dense, abs=1e-5)
        assert delta != 0


@torch.no_grad()
def _mean_loss(model, windows) -> float:
    total = count = 0.0
    for w in windows:
        logits = model(input_ids=w.unsqueeze(0)).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += len(w) - 1
    return total / count


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
    assert fusion["magnitude"]["inconsistency"] == 0 < fusion["magnitude"]["loss"]  # steady, yet not exact
    assert all(-1 <= f["probe_spearman"] <= 1 for f in fusion.values())
    for f in fusion.values():
        assert 0 < f["loss"] < 0.5 and f["sigma"] ** 2 == pytest.approx(f["loss"], rel=1e-5)


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
    from metricgp.structured.saap.allocation import propensities, water_fill

    importance = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    stability = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    pi = propensities(importance, stability, spread=0.5)
    assert pi.tolist() == [1.5, 1.0, 0.5]
    units = [Unit(m, "channel", (i,), (), 10, 0.0) for m in "abc" for i in range(100)]
    removed = water_fill(units, 600, dict(zip("abc", pi.tolist(), strict=True)))
    assert removed == {"a": 30, "b": 20, "c": 10}  # fractions in proportion to pi, 600 params exactly
