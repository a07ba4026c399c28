"""The leaf registry: the inverse-Hessian diagonal leaf, statistics that follow the registry (a leaf
added in one place is parsed, printed, compiled, computed, cached and searchable), and the
scale-free check the search breaks ties with."""

from __future__ import annotations

import pytest
import sympy
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from metricgp.expr import LEAVES, canonical_key, compile_metric, parse, resolve_metric, to_latex, to_sympy
from metricgp.expr.invariance import is_scale_free
from metricgp.expr.ops import HESSIAN_DAMP, MEAN_SQUARE, Leaf, Statistic
from metricgp.search.space import space_from_dict
from metricgp.search.trees import build_grammar, node_to_tree, tree_to_node
from metricgp.stats import cached_stats, compute_stats, stats_cache_path

MEAN_ABS = Statistic(start=lambda shape, dev: torch.zeros(shape, device=dev),
                     add=lambda s, x: s.add_(x.abs().sum(dim=0)),
                     finish=lambda s, n: (s / max(n, 1)).unsqueeze(0))


def _stats_and_inputs(model, name: str, layer, calib) -> tuple[dict, torch.Tensor]:
    """compute_stats (no gradients) of one layer, and the inputs that layer sees in the model's forward."""
    stats = compute_stats(model, {name: layer}, calib, grads=False)
    seen = []  # the layer's inputs in the model's own forward passes over the windows
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for window in calib:
            model(input_ids=window[None])
    handle.remove()
    return stats[name], torch.cat(seen)


def test_hinv_is_the_damped_inverse_hessian_diagonal():
    torch.manual_seed(0)
    model = tiny_model("llama", vocab=50)
    down = model.model.layers[0].mlp.down_proj
    stats, x = _stats_and_inputs(model, "down", down, torch.randint(0, 50, (3, 10)))
    x = x.double()
    h = x.T @ x / x.shape[0]
    h += HESSIAN_DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    expected = torch.linalg.inv(h).diagonal().unsqueeze(0)
    assert stats["Hinv"].shape == (1, down.in_features)
    assert torch.allclose(stats["Hinv"].double(), expected, rtol=1e-4)
    assert "G" not in stats  # no gradient pass was asked for


def test_sparsegpt_saliency_is_expressible_and_scale_free():
    tree = resolve_metric("sparsegpt")
    assert tree == parse("sqr(W) / Hinv")
    assert to_latex(tree) == r"\frac{\left(W\right)^{2}}{\left[H^{-1}\right]_{jj}}"
    w, hinv = torch.randn(3, 5), torch.rand(1, 5) + 0.1
    assert torch.allclose(compile_metric(tree)({"W": w, "Hinv": hinv}), w.square() / hinv)
    assert is_scale_free(tree) and is_scale_free(resolve_metric("wanda"))
    assert not is_scale_free(resolve_metric("gblm"))  # 100 * G encodes one model's gradient scale
    assert is_scale_free(parse("abs(W) * (sqrt(X) / mms(X) + G)")) is False


def test_an_old_cache_without_a_new_leaf_is_completed_not_recomputed(tmp_path):
    model = tiny_model("llama", vocab=50)
    layers = {"q": model.model.layers[0].self_attn.q_proj, "up": model.model.layers[1].mlp.up_proj}
    calib = torch.randint(0, 50, (2, 8))
    full, cached = cached_stats(model, layers, calib, "k", grads=True, cache_dir=tmp_path)
    assert not cached and {"X", "G", "Hinv"} <= set(full["q"])
    path = stats_cache_path("k", tmp_path)
    old = {k: v for k, v in load_file(str(path)).items() if not k.endswith("|Hinv")}  # as written before Hinv
    save_file(old, str(path))
    g_before = full["up"]["G"].clone()
    model.model.layers[1].mlp.up_proj.weight.data.mul_(0)  # a recomputed G would now differ
    again, cached = cached_stats(model, layers, calib, "k", grads=True, cache_dir=tmp_path)
    assert cached and torch.equal(again["up"]["G"], g_before)
    assert torch.allclose(again["q"]["Hinv"], full["q"]["Hinv"])
    assert any(k.endswith("|Hinv") for k in load_file(str(path)))  # written back


@pytest.fixture()
def mean_abs_leaf(monkeypatch):
    monkeypatch.setitem(LEAVES, "A", Leaf("A", True, "mean |x| per input feature", "inputs", MEAN_ABS))


def test_a_leaf_registered_in_one_place_works_end_to_end(mean_abs_leaf):
    tree = parse("abs(W) * A")
    assert str(tree) == "mul(abs(W), A)" and to_latex(tree) == r"\left|W\right| \cdot A"
    assert to_sympy(parse("abs(A)")) == sympy.Symbol("A", nonnegative=True)  # its sign fact reaches sympy
    assert canonical_key(tree) == canonical_key(parse("A * abs(W)"))
    model = tiny_model("llama", vocab=50)
    stats, x = _stats_and_inputs(model, "k", model.model.layers[0].self_attn.k_proj, torch.randint(0, 50, (2, 8)))
    assert torch.allclose(stats["A"], x.abs().mean(0, keepdim=True), rtol=1e-5)
    space = space_from_dict({"leaves": ["W", "A"], "operators": ["abs", "mul"]})
    grammar = build_grammar(space)
    assert tree_to_node(node_to_tree(tree, grammar)) == tree


def test_sequential_mode_recomputes_only_the_input_leaves_the_metric_reads(monkeypatch):
    from metricgp.prune import engine
    from metricgp.prune.patterns import Unstructured

    calls = []
    real = engine.collect_input_stats

    def spy(layers, run_forward, leaves=None):
        calls.append(tuple(leaves) if leaves is not None else None)
        return real(layers, run_forward, leaves)

    monkeypatch.setattr(engine, "collect_input_stats", spy)
    model = tiny_model("llama", vocab=50)
    calib = torch.randint(0, 50, (2, 8))
    report = engine.prune_sequential(model, calib, None, compile_metric(resolve_metric("sparsegpt")),
                                     Unstructured(0.5))
    assert calls and all(c == ("Hinv",) for c in calls)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    calls.clear()
    engine.prune_sequential(model, calib, None, compile_metric(resolve_metric("magnitude")), Unstructured(0.5))
    assert calls and all(c == () for c in calls)


def test_every_statistic_leaf_has_a_statistic_and_weight_leaves_none():
    with pytest.raises(ValueError, match="statistic is needed"):
        Leaf("Z", True, "no statistic", "inputs")
    with pytest.raises(ValueError, match="source must be one of"):
        Leaf("Z", True, "bad source", "outputs", MEAN_SQUARE)
    assert {lf.source for lf in LEAVES.values()} == {"weight", "inputs", "gradients"}
