"""Statistics (values, caching) and the pruning engine (oneshot, sequential) on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from metricgp.evaluate import EvaluatorSpec, PruningSetup
from metricgp.expr import compile_metric, resolve_metric
from metricgp.measure import perplexity
from metricgp.prune.engine import DegenerateMetric, DenseWeights, prune_oneshot
from metricgp.prune.patterns import NM, Unstructured
from metricgp.stats import cached_stats, compute_stats


def test_x_is_mean_squared_input_and_g_is_grad_norm():
    torch.manual_seed(0)
    model = tiny_model("llama", vocab=50)
    layers = {"q": model.model.layers[0].self_attn.q_proj}
    calib = torch.randint(0, 50, (3, 10))
    stats = compute_stats(model, layers, calib, grads=True)
    seen = []  # what the layer sees in the model's own forward passes over the windows
    handle = layers["q"].register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, 32)))
    with torch.no_grad():
        for window in calib:
            model(input_ids=window[None])
    handle.remove()
    x = torch.cat(seen)
    assert torch.allclose(stats["q"]["X"], x.square().mean(0, keepdim=True), rtol=1e-5)
    grads = []
    for window in calib:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        grads.append(layers["q"].weight.grad.clone())
    expected = torch.stack(grads).square().sum(0).sqrt()
    assert torch.allclose(stats["q"]["G"], expected, rtol=1e-4, atol=1e-8)
    assert not any(p.requires_grad is False for p in model.parameters())  # restored as it was


def test_statistics_second_load_is_a_cache_hit(tmp_path):
    model = tiny_model("llama", vocab=50)
    layers = {"up": model.model.layers[1].mlp.up_proj}
    calib = torch.randint(0, 50, (2, 8))
    first, cached = cached_stats(model, layers, calib, "k1", grads=True, cache_dir=tmp_path)
    assert not cached
    second, cached = cached_stats(model, layers, calib, "k1", grads=True, cache_dir=tmp_path)
    assert cached and torch.equal(first["up"]["G"], second["up"]["G"])
    assert torch.equal(first["up"]["X"], second["up"]["X"])
    _, cached = cached_stats(model, layers, calib, "k2", grads=False, cache_dir=tmp_path)
    assert not cached  # a different key is a different pass


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, text_files, tmp_path_factory):
    import os

    os.environ["METRICGP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    spec = EvaluatorSpec(model=str(tiny_llama_dir), calib=str(text_files["calib"]), n_calib=4,
                         valid=str(text_files["valid"]), seqlen=32, fidelities=(1, 2))
    s = PruningSetup.from_spec(spec)
    yield s
    del os.environ["METRICGP_CACHE"]


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.3, "layer"), NM(2, 4), NM(4, 8)])
@pytest.mark.parametrize("mode", ["oneshot", "sequential", "reconstruct"])
def test_modes_hit_exact_sparsity(setup, pattern, mode):
    report = setup.prune(resolve_metric("wanda"), pattern, mode)
    for name, module in setup.layers.items():
        zeros = int((module.weight == 0).sum())
        assert zeros == round(report.layer_sparsity[name] * module.weight.numel())
    assert math.isclose(report.sparsity, pattern.sparsity, abs_tol=1e-3)
    setup.dense.restore()


def test_sequential_differs_from_oneshot_and_restore_is_exact(setup):
    dense = {n: m.weight.detach().clone() for n, m in setup.layers.items()}
    setup.prune(resolve_metric("wanda"), Unstructured(0.5), "oneshot")
    oneshot = {n: m.weight.detach().clone() for n, m in setup.layers.items()}
    setup.prune(resolve_metric("wanda"), Unstructured(0.5), "sequential")
    # block 0 sees the same inputs either way; later blocks see the pruned prefix's outputs
    first = next(iter(setup.layers))
    assert torch.equal(setup.layers[first].weight != 0, oneshot[first] != 0)
    assert any(not torch.equal(m.weight != 0, oneshot[n] != 0) for n, m in setup.layers.items())
    setup.dense.restore()
    assert all(torch.equal(m.weight, dense[n]) for n, m in setup.layers.items())


def test_degenerate_metric_is_reported_not_applied(setup):
    with pytest.raises(DegenerateMetric, match="constant"):
        prune_oneshot(setup.dense, setup.stats, compile_metric(resolve_metric("sub(W, W)")), Unstructured(0.5))
    setup.dense.restore()


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 37) + self.p})()

    assert math.isclose(perplexity(Uniform(), torch.randint(0, 37, (3, 9))), 37.0, rel_tol=1e-6)


def test_dense_weights_restore():
    model = tiny_model("qwen2", vocab=40)
    layers = {"o": model.model.layers[0].self_attn.o_proj}
    dense = DenseWeights(layers)
    before = layers["o"].weight.detach().clone()
    with torch.no_grad():
        layers["o"].weight.zero_()
    dense.restore()
    assert torch.equal(layers["o"].weight, before)


def test_a_loaded_setup_restores_from_its_checkpoint_and_keeps_no_copy(setup):
    """The session reads its dense weights back from the safetensors it was loaded from: no second copy in
    memory, and only the layers that changed are rewritten."""
    assert setup.dense.source == "checkpoint" and setup.dense._copy is None
    dense = {n: m.weight.detach().clone() for n, m in setup.layers.items()}
    first, second = list(setup.layers)[:2]
    assert setup.dense.weights[first] is not None and setup.dense.unchanged(first)
    with torch.no_grad():
        setup.layers[first].weight.mul_(0)
    assert not setup.dense.unchanged(first) and setup.dense.unchanged(second)
    assert torch.equal(setup.dense.weights[first], dense[first])  # read back, not the zeroed tensor
    untouched = setup.layers[second].weight._version
    setup.dense.restore()
    assert setup.layers[second].weight._version == untouched  # an unchanged layer is not rewritten
    assert all(torch.equal(m.weight, dense[n]) for n, m in setup.layers.items())
    # pruning twice without a restore prunes the dense weights both times (read back from the file)
    setup.prune(resolve_metric("wanda"), Unstructured(0.5))
    once = {n: m.weight.detach().clone() for n, m in setup.layers.items()}
    prune_oneshot(setup.dense, setup.stats, compile_metric(resolve_metric("wanda")), Unstructured(0.5))
    assert all(torch.equal(m.weight, once[n]) for n, m in setup.layers.items())
    setup.dense.restore()
    assert all(torch.equal(m.weight, dense[n]) for n, m in setup.layers.items())


@pytest.mark.parametrize("threads", [1, 2])
def test_restoring_from_the_checkpoint_on_threads_rewrites_every_changed_layer(setup, threads):
    """The read-back restore runs on torch's threads (one read per layer); whatever the count, every
    changed layer gets its dense weight back and an unchanged one is not rewritten."""
    from metricgp.experiments.bench import restore_profile

    dense = {n: m.weight.detach().clone() for n, m in setup.layers.items()}
    names = list(setup.layers)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for n in names[1:]:
                setup.layers[n].weight.mul_(0.5)
        untouched = setup.layers[names[0]].weight._version
        setup.dense.restore()
        assert setup.layers[names[0]].weight._version == untouched
        assert all(torch.equal(m.weight, dense[n]) and setup.dense.unchanged(n) for n, m in setup.layers.items())
        profile = restore_profile(setup, repeats=1)
        assert profile["threads"] == threads
        assert {"checkpoint_threads", "checkpoint_one_thread", "kept_copy"} <= profile.keys()
        assert all(torch.equal(m.weight, dense[n]) for n, m in setup.layers.items())
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_that_does_not_match_the_model_is_not_used(tiny_llama_dir):
    """Weights changed after loading (or a loader that transforms them) make the checkpoint a wrong source
    of dense weights: a copy is kept instead, and restores what the model held."""
    from transformers import AutoModelForCausalLM

    from metricgp.models import checkpoint_tensors, prunable_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = prunable_layers(model)
    assert DenseWeights(layers, checkpoint_tensors(str(tiny_llama_dir))).source == "checkpoint"
    with torch.no_grad():
        next(iter(layers.values())).weight.add_(1.0)
    held = {n: m.weight.detach().clone() for n, m in layers.items()}
    dense = DenseWeights(layers, checkpoint_tensors(str(tiny_llama_dir)))
    assert dense.source == "copy"
    with torch.no_grad():
        for m in layers.values():
            m.weight.zero_()
    dense.restore()
    assert all(torch.equal(m.weight, held[n]) for n, m in layers.items())


def test_checkpoint_tensors_read_a_sharded_checkpoint_in_any_dtype(tmp_path):
    """A sharded checkpoint (index + shards) is read by name; `read_into` fills a tensor of the stored dtype
    straight from the file and converts into any other."""
    from transformers import AutoModelForCausalLM

    from metricgp.models import CheckpointTensors

    model = tiny_model("llama", vocab=64)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tensors = CheckpointTensors(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, p in reloaded.named_parameters():
        if name in tensors:
            assert torch.equal(tensors[name], p.detach())
            same, half = torch.empty_like(p), torch.empty_like(p, dtype=torch.bfloat16)
            tensors.read_into(name, same)
            tensors.read_into(name, half)
            assert torch.equal(same, p.detach()) and torch.equal(half, p.detach().bfloat16())


def test_only_the_input_leaves_asked_for_are_computed_and_a_cache_is_completed_later(tmp_path):
    """A metric that reads X alone never pays for Hinv (a Cholesky inverse per layer); a later metric that
    reads Hinv completes the same cache file with it, and the values equal a pass that made both at once."""
    model = tiny_model("llama", vocab=40)
    layers = {"up": model.model.layers[0].mlp.up_proj, "down": model.model.layers[1].mlp.down_proj}
    calib = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(0))
    x_only, cached = cached_stats(model, layers, calib, "k", grads=False, cache_dir=tmp_path, inputs={"W", "X"})
    assert not cached and all(set(per) == {"X"} for per in x_only.values())
    both, cached = cached_stats(model, layers, calib, "k", grads=False, cache_dir=tmp_path, inputs={"X", "Hinv"})
    assert cached and all(set(per) == {"X", "Hinv"} for per in both.values())
    reference = compute_stats(model, layers, calib, grads=False)
    assert all(torch.equal(both[n][k], reference[n][k]) for n in layers for k in ("X", "Hinv"))
