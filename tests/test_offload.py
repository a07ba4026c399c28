"""Block-by-block offloading (`metricgp.offload`, `--offload`): the same numbers as a model that lives on its
device, one block resident at a time, host storage given back untouched when a block was only read.

On this CPU the "device" is the CPU too, but every visit still copies the block into tensors of its own
(`copy=True`), so what is checked here is the bookkeeping a GPU run relies on; device placement itself is
only exercised on a GPU (`make gpu-check`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from metricgp.cli.apply import main
from metricgp.expr import compile_metric, resolve_metric
from metricgp.models import find_blocks, prunable_layers
from metricgp.offload import BlockOffload, offload_of, resident
from metricgp.prune.engine import DenseWeights, prune_sequential
from metricgp.prune.patterns import parse_pattern
from metricgp.stats import compute_stats
from tests.conftest import tiny_config


def _model(layers: int = 3):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", 300)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _offloaded(model):
    twin = copy.deepcopy(model)
    return twin, BlockOffload.install(twin, find_blocks(twin)[1], "cpu")


def _host_pointers(model) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in model.named_parameters()}


def test_a_forward_runs_one_block_at_a_time_and_gives_the_same_logits(one_thread):
    model = _model()
    twin, offload = _offloaded(model)
    blocks = find_blocks(twin)[1]
    seen: list[tuple[int, bool]] = []  # (blocks resident, this block's weight off its host storage) per block run
    host = _host_pointers(twin)
    for i, block in enumerate(blocks):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        block.self_attn.register_forward_pre_hook(
            lambda m, _a, name=name: seen.append((offload.resident_blocks, m.q_proj.weight.data_ptr() != host[name])))
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert torch.equal(expected, got)
    assert seen == [(1, True)] * len(blocks)  # each block ran alone, on its own copy
    assert offload.moves == len(blocks) and offload.resident_blocks == 0
    assert _host_pointers(twin) == host  # every block got its own host storage back, nothing copied home


def test_statistics_and_sequential_reconstruction_equal_the_resident_model(one_thread):
    model = _model()
    twin, offload = _offloaded(model)
    calib = torch.randint(0, 300, (3, 16))
    expected = compute_stats(model, prunable_layers(model), calib)
    got = compute_stats(twin, prunable_layers(twin), calib)
    assert set(next(iter(got.values()))) == {"X", "Hinv", "G"}
    assert all(torch.equal(expected[n][leaf], got[n][leaf]) for n in expected for leaf in expected[n])
    assert offload.peak_resident == 1

    metric, pattern = compile_metric(resolve_metric("sparsegpt")), parse_pattern("unstructured", 0.5)
    prune_sequential(model, calib, expected, metric, pattern, reconstruct=True)
    prune_sequential(twin, calib, got, metric, pattern, reconstruct=True)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # the re-fitted weights came home
    assert offload.peak_resident == 1 and offload.resident_blocks == 0


def test_a_block_written_while_resident_is_copied_home_and_no_longer_counts_as_dense():
    twin, _ = _offloaded(_model(2))
    layers = prunable_layers(twin)
    dense = DenseWeights(layers)
    name = "model.layers.1.mlp.down_proj"
    host = layers[name].weight.data_ptr()
    with resident(twin, find_blocks(twin)[1][0]):  # read only
        pass
    assert all(dense.unchanged(n) for n in layers)
    with resident(twin, find_blocks(twin)[1][1]), torch.no_grad():
        layers[name].weight.mul_(0)
    assert layers[name].weight.data_ptr() == host and not layers[name].weight.any()
    assert not dense.unchanged(name) and dense.unchanged("model.layers.0.mlp.down_proj")
    dense.restore()
    assert layers[name].weight.any() and dense.unchanged(name)


def test_nested_visits_move_a_block_once():
    twin, offload = _offloaded(_model(2))
    block = find_blocks(twin)[1][0]
    with resident(twin, block):
        with torch.no_grad():
            twin(input_ids=torch.randint(0, 300, (1, 8)))
        assert offload.resident_blocks == 1
    assert offload.moves == 2 and offload.resident_blocks == 0  # block 0 once (held), block 1 once
    assert offload_of(_model(1)) is None


@pytest.mark.parametrize("extra", [
    ["--metric", "mul(abs(W), G)"],
    ["--metric", "wanda", "--pattern", "2:4", "--mode", "reconstruct"],
    ["--structured", "--metric", "wanda", "--keep", "0.7", "--refit"],
    ["--structured", "--method", "flap", "--keep", "0.7"],
    ["--structured", "--metric", "wanda", "--keep", "0.7", "--recover-tokens", "96", "--recover-method", "lora",
     "--recover-loss", "kd", "--recover-checkpointing"],
], ids=["oneshot-G", "reconstruct-2:4", "structured-refit", "flap", "structured-lora-kd"])
def test_apply_with_offload_writes_what_apply_without_it_writes(tmp_path, tiny_llama_dir, text_files, isolated_cache,
                                                                 extra, device="cpu"):
    base = ["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4", "--seqlen", "32",
            "--dataset", str(text_files["test"]), "--eval-windows", "4", "--device", device, *extra]
    outs = []
    for offload in ([], ["--offload"]):
        out = tmp_path / f"run{len(offload)}"
        assert main([*base, *offload, "--out", str(out)]) == 0
        outs.append((json.loads((out / "report.json").read_text()), load_file(str(out / "model.safetensors"))))
    (plain, plain_weights), (offloaded, offloaded_weights) = outs
    assert offloaded["model"]["offloaded"] and not plain["model"]["offloaded"]
    assert plain_weights.keys() == offloaded_weights.keys()
    if device == "cpu":
        assert offloaded["perplexity"] == plain["perplexity"]
        assert all(torch.equal(plain_weights[k], offloaded_weights[k]) for k in plain_weights)
    else:  # a GPU's kernels may sum in another order from one launch to the next
        for data, ppl in plain["perplexity"]["pruned"].items():
            assert offloaded["perplexity"]["pruned"][data] == pytest.approx(ppl, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [
    ["--metric", "mul(abs(W), G)"],
    ["--metric", "wanda", "--pattern", "2:4", "--mode", "reconstruct"],
    ["--structured", "--metric", "wanda", "--keep", "0.7", "--refit"],
    ["--structured", "--method", "flap", "--keep", "0.7"],
    ["--structured", "--metric", "wanda", "--keep", "0.7", "--recover-tokens", "96", "--recover-method", "lora"],
], ids=["oneshot-G", "reconstruct-2:4", "structured-refit", "flap", "structured-lora"])
def test_apply_with_offload_on_a_gpu_writes_what_apply_without_it_writes(tmp_path, tiny_llama_dir, text_files,
                                                                          isolated_cache, extra):
    """Where the host and the device are two memories: nothing mixes them."""
    test_apply_with_offload_writes_what_apply_without_it_writes(tmp_path, tiny_llama_dir, text_files, isolated_cache,
                                                                extra, device="cuda")


def test_recovery_that_would_upcast_every_block_is_a_one_line_error_under_offload(tmp_path, tiny_llama_dir, text_files,
                                                                                 isolated_cache, capsys):
    out = tmp_path / "r"
    assert main(["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--metric", "wanda",
                 "--offload", "--recover-tokens", "64", "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--offload" in err


def test_lazy_statistics_equal_the_eager_ones_and_are_read_a_layer_at_a_time(tmp_path, monkeypatch):
    from metricgp import stats as stats_module

    model = _model(2)
    layers = prunable_layers(model)
    calib = torch.randint(0, 300, (3, 16))
    eager, _ = stats_module.cached_stats(model, layers, calib, "k", cache_dir=tmp_path / "eager")
    monkeypatch.setattr(stats_module, "PART_BYTES", 4096)  # many part files
    lazy, cached = stats_module.cached_stats(model, layers, calib, "k", cache_dir=tmp_path / "lazy", lazy=True,
                                             inputs=["X"])
    assert isinstance(lazy, stats_module.LazyStats) and not cached and len(lazy.files) > 2
    assert not any(isinstance(v, torch.Tensor) for v in vars(lazy).values())  # headers only
    assert lazy.common_leaves() == {"X", "G"}
    # a metric that needs another input leaf completes the parts directory with a forward pass
    lazy, cached = stats_module.cached_stats(model, layers, calib, "k", cache_dir=tmp_path / "lazy", lazy=True)
    assert cached and lazy.common_leaves() == {"X", "Hinv", "G"} and set(lazy) == set(eager)
    for name in eager:
        got = lazy[name]
        assert got.keys() == eager[name].keys()
        assert all(torch.equal(got[leaf], eager[name][leaf]) for leaf in got), name
        assert lazy[name]["G"] is not got["G"]  # read afresh each time, never kept
    # the eager form of the same cache reads the parts too
    again, cached = stats_module.cached_stats(model, layers, calib, "k", cache_dir=tmp_path / "lazy")
    assert cached and isinstance(again, dict) and torch.equal(again[name]["Hinv"], eager[name]["Hinv"])
