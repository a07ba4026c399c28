"""What running at scale needs, checked on tiny models: few device syncs in structured scoring, only
the statistics a formula reads moved to the device, no device mixing (weights on `meta` stand in for a
GPU), an out-of-memory error that stops a search instead of scoring `inf`, and cache files that two
writers at once cannot corrupt."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from structured_models import family_model
from torch.utils._python_dispatch import TorchDispatchMode

from metricgp.darwin.owl import wanda_scores
from metricgp.errors import OutOfMemory
from metricgp.evaluate import FitnessResult
from metricgp.expr import compile_metric, resolve_metric
from metricgp.prune.engine import metric_inputs
from metricgp.search.backends import safe_evaluate
from metricgp.structured.groups import discover, linears_by_name
from metricgp.structured.importance import REDUCTIONS, element_scores, module_partial, score_units

ROOT = Path(__file__).resolve().parents[1]


class CountScalarReads(TorchDispatchMode):
    """Counts reads of one tensor element into Python (`float(t)`, `t.item()`): each is a device sync."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def llama(intermediate: int, heads: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate,
                                      num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=2,
                                      head_dim=8)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def reads_to_python(model, reduction: str, head_mode: str, monkeypatch) -> tuple[int, int, int]:
    """(element reads + vector transfers into Python, units, modules) of scoring every unit."""
    modules, linears = discover(model), linears_by_name(model)
    names = {s.linear for m in modules for s in m.slices + m.kv_slices}
    scores = element_scores(compile_metric(resolve_metric("magnitude")), linears, {}, names)
    transfers = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: transfers.append(t.numel()) or original(t))
    with CountScalarReads() as counter:
        units = score_units(modules, linears, scores, reduction, "none", head_mode)
    monkeypatch.undo()
    return counter.reads + len(transfers), len(units), len(modules)


@pytest.mark.parametrize("head_mode", ["per-group", "kv-group"])
@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
def test_structured_scoring_syncs_per_module_not_per_unit(head_mode, reduction, monkeypatch):
    small = reads_to_python(llama(48, 4), reduction, head_mode, monkeypatch)
    wide = reads_to_python(llama(192, 8), reduction, head_mode, monkeypatch)
    assert wide[1] >= 3 * small[1] and wide[2] == small[2]  # 3x the units in as many modules ...
    assert wide[0] == small[0] <= 3 * small[2]  # ... read back in as many transfers, a few per module


def test_a_formula_without_g_moves_no_g():
    weight = torch.randn(4, 6)
    stats = {"X": torch.rand(1, 6), "G": torch.empty(4, 6, device="meta")}  # moving G would raise
    wanda = compile_metric(resolve_metric("wanda"))
    assert set(metric_inputs(wanda, weight, stats)) == {"W", "X"}
    gblm = compile_metric(resolve_metric("gblm"))
    with pytest.raises((NotImplementedError, RuntimeError)):
        metric_inputs(gblm, weight, stats)


def test_owl_scores_weights_on_another_device_than_the_statistics():
    weight = torch.empty(4, 6, device="meta")  # stands in for a GPU: any mixing with the host raises
    scores = wanda_scores(weight, {"X": torch.rand(1, 6)})
    assert scores.device.type == "meta" and scores.shape == (4, 6)


def test_mean_reduction_stays_on_the_scores_device():
    model = family_model("llama")
    modules, linears = discover(model), linears_by_name(model)
    mlp = next(m for m in modules if m.kind == "mlp")
    scores = {s.linear: torch.empty_like(linears[s.linear].weight, device="meta") for s in mlp.slices}
    part = module_partial(mlp, scores, REDUCTIONS["mean"])
    final = REDUCTIONS["mean"].final(part.value, part.count)
    assert final.device.type == "meta" and final.shape == (mlp.n_elements,)


class Evaluator:
    def __init__(self, error: BaseException):
        self.error = error

    def evaluate(self, candidate, n_windows):
        raise self.error


def test_out_of_memory_in_an_evaluation_stops_the_run_with_one_line():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity")
    with pytest.raises(OutOfMemory, match=r"search evaluation \(4 windows\), asked for 2.50 GiB") as err:
        safe_evaluate(Evaluator(oom), "tree", 4)
    assert "\n" not in str(err.value)
    with pytest.raises(OutOfMemory):
        safe_evaluate(Evaluator(MemoryError()), "tree", 4)


def test_any_other_failure_of_a_candidate_is_still_its_degenerate_score():
    res = safe_evaluate(Evaluator(ValueError("bad formula")), "tree", 4)
    assert isinstance(res, FitnessResult) and math.isinf(res.fitness) and "bad formula" in res.reason


WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from metricgp.fileio import atomic_path
    path, value = Path(sys.argv[1]), float(sys.argv[2])
    for _ in range(40):
        with atomic_path(path) as tmp:
            save_file({"t": torch.full((256, 1024), value)}, str(tmp))
""")


def test_two_processes_writing_one_cache_never_corrupt_it(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "stats" / "key.safetensors"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(v)], cwd=ROOT) for v in (1.0, 2.0)]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    t = load_file(str(path))["t"]
    assert t.shape == (256, 1024) and t.unique().tolist() in ([1.0], [2.0])  # one writer's whole file
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def gemma3_softcapped():
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                           final_logit_softcapping=3.0)
    return transformers.Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("make", [lambda: family_model("llama"), lambda: family_model("qwen2"), gemma3_softcapped],
                         ids=["llama", "qwen2", "gemma3-softcapped"])
def test_chunked_logits_give_the_numbers_of_whole_logits(make, monkeypatch):
    from metricgp import blocks
    from metricgp import measure as evaluate

    model = make()
    windows = torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(blocks, "LOGIT_CHUNK_ELEMENTS", 300 * 5)  # chunks of 5 positions
    chunked_ref = evaluate.DenseReference.build(model, windows)
    with torch.no_grad():
        for p in model.parameters():  # a different model to measure KL to
            p.mul_(1.01)
    chunked = evaluate.window_losses(model, windows, batch_size=2, reference=chunked_ref)
    assert evaluate._HEADS[model] is not None  # the chunked path was taken
    evaluate._HEADS[model] = None  # the model's whole logits
    whole = evaluate.window_losses(model, windows, batch_size=2, reference=chunked_ref)
    assert chunked.tokens == whole.tokens and len(chunked.kl) == len(whole.kl) == 5
    for a, b in zip(chunked.nll + chunked.kl, whole.nll + whole.kl, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.div_(1.01)
    whole_ref = evaluate.DenseReference.build(model, windows)
    assert torch.allclose(whole_ref.top_logp, chunked_ref.top_logp, rtol=1e-5, atol=1e-6)


class LargestVocabTensor(TorchDispatchMode):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        is_weight = isinstance(out, torch.Tensor) and out.shape in ((32, self.vocab), (self.vocab, 32))  # hidden 32
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[-1] == self.vocab and not is_weight:
            self.largest = max(self.largest, out.numel())
        return out


def test_a_batch_never_holds_its_whole_logits(monkeypatch):
    from metricgp import blocks
    from metricgp import measure as evaluate

    model = family_model("llama", vocab=997)  # a vocabulary no other dimension equals
    windows = torch.randint(0, 997, (4, 24), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(blocks, "LOGIT_CHUNK_ELEMENTS", 997 * 8)
    evaluate.window_losses(model, windows[:1], batch_size=4)  # the one-off check of the head, on 8 tokens
    with LargestVocabTensor(997) as seen:
        evaluate.window_losses(model, windows, batch_size=4)
    assert 0 < seen.largest <= 997 * 8 < 4 * 24 * 997


def whole_model_statistics(model, layers, calib):
    """X and G as the statistics pass computed them before it went block by block: hooks on the whole
    model's forward, one whole-model backward per window."""
    xs = {n: [] for n in layers}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
               for n, m in layers.items()]
    grads = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
    for window in calib:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        for n, m in layers.items():
            grads[n] += m.weight.grad.square()
    for h in handles:
        h.remove()
    model.zero_grad()
    return {n: {"X": torch.cat(xs[n]).square().mean(0, keepdim=True), "G": grads[n].sqrt()} for n in layers}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gemma3"])
def test_block_by_block_statistics_equal_the_whole_model_pass(family):
    from metricgp.models import prunable_layers
    from metricgp.stats import compute_stats

    model = family_model(family)
    if family == "gemma3":  # sliding windows shorter than a window, so the blocks' masks differ
        model.config.sliding_window = 4
        model = type(model)(model.config).eval()
    layers = prunable_layers(model)
    calib = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    mine = compute_stats(model, layers, calib, grads=True)
    expected = whole_model_statistics(model, layers, calib)
    for name in layers:
        for leaf in ("X", "G"):
            assert torch.allclose(mine[name][leaf], expected[name][leaf], rtol=1e-4, atol=1e-7), (name, leaf)
    assert all(p.grad is None for p in model.parameters())


def test_bench_scale_measures_a_phase_in_a_fresh_process_and_reads_per_block_costs(tmp_path):
    from metricgp.experiments import scale

    [row] = scale.measure("model", "tiny", 1, dtype="float32")
    assert set(row) >= {"phase", "layers", "hidden", "intermediate", "model_bytes", "peak_bytes", "seconds"}
    assert row["peak_bytes"] > row["base_bytes"] + row["model_bytes"] > row["model_bytes"] > row["block_bytes"] > 0
    rows = [{"phase": "statistics", "shape": "8b", "layers": n, "block_bytes": 100, "peak_bytes": 1000 + 150 * n,
             "base_bytes": 10, "held_bytes": 50 * n} for n in (1, 2, 4)]
    costs = scale.per_block_costs(rows)
    assert [(c["from"], c["to"], c["ratio"], c["device_ratio"]) for c in costs] == [(1, 2, 1.5, 1.0), (2, 4, 1.5, 1.0)]
    assert scale.main(["--shapes", "1b", "--out", str(tmp_path)]) == 2
    assert scale.main(["--layers", "1,x", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())  # nothing written for bad input



@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_by_block_output_hessians_equal_the_whole_model_pass(family, tmp_path):
    from metricgp.prune.reconstruct import hessian_hooks
    from metricgp.structured.refit import HessianStore, output_hessians

    model = family_model(family)
    modules, linears = discover(model), linears_by_name(model)
    outs = {m.slices[-1].linear: linears[m.slices[-1].linear] for m in modules}
    calib = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    whole: dict[str, torch.Tensor] = {}
    with torch.no_grad(), hessian_hooks(outs, whole):
        for window in calib:
            model(input_ids=window[None], use_cache=False)
    store = HessianStore(tmp_path / "h")
    blocks = []
    for block, hessians in output_hessians(model, outs, calib):
        blocks.append(block)
        assert all(f".{block}." in name for name in hessians) and len(hessians) == 2  # attention's, MLP's
        store.add(block, hessians)
    assert blocks == [0, 1, 2] and set(store) == set(outs)
    again = HessianStore(tmp_path / "h")  # read back from disk, one matrix at a time
    for name, h in whole.items():
        torch.testing.assert_close(again[name], h / calib.numel(), rtol=1e-4, atol=1e-6)


def test_a_structured_copy_arrives_block_by_block_and_frees_what_shrinking_replaces():
    import gc
    import weakref

    from metricgp.structured.shrink import copy_block_by_block, slice_linear

    model = family_model("llama", layers=4)
    twin, blocks = copy_block_by_block(model)
    replaced = []
    for i in blocks:
        assert len(twin.model.layers) == i + 1  # blocks arrive one at a time
        mlp = twin.model.layers[i].mlp
        replaced.append(weakref.ref(mlp.down_proj))
        mlp.down_proj = slice_linear(mlp.down_proj, cols=torch.arange(24))  # what shrinking does
        gc.collect()
        assert replaced[-1]() is None  # freed while the copy is still arriving: nothing else holds it
    assert len(replaced) == 4
    assert twin.model.layers[0].self_attn.config is twin.config is not model.config  # sharing kept
    assert all(p.data_ptr() != q.data_ptr() for p in twin.parameters() for q in model.parameters())


def test_the_whole_model_writer_builds_a_loadable_checkpoint_one_block_per_shard(tmp_path, tiny_llama_dir):
    """`whole_model write` never holds the model: a shard per block (and one for the rest), every parameter
    of the architecture stored once, norms at one, and the checkpoint loads in stock transformers."""
    from transformers import AutoModelForCausalLM

    from metricgp.experiments.whole_model import write_checkpoint

    total = write_checkpoint(tmp_path, shape="tiny", layers=3, tokenizer_from=str(tiny_llama_dir),
                             dtype=torch.float32)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-block-{i:03d}.safetensors" for i in range(3)] + [
        "model-outer.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    params = dict(model.named_parameters())
    assert set(params) <= set(index["weight_map"]) and total == sum(p.numel() * 4 for p in params.values())
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 64
    assert torch.equal(params["model.layers.1.input_layernorm.weight"], torch.ones(64))
    q = params["model.layers.2.self_attn.q_proj.weight"]
    assert 0.015 < float(q.detach().std()) < 0.025
