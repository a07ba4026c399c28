"""Recovery fine-tuning on a tiny random Llama whose layers were physically shrunk."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.models import prunable_layers
from metricgp.structured.recover import recover

SEQLEN = 16


def _slice(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A smaller copy of `linear` keeping the given output rows and/or input columns."""
    weight = linear.weight.data
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data = weight.clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone() if rows is None else linear.bias.data[rows].clone()
    return new


def shrunk_llama() -> nn.Module:
    """Block 0 keeps half its MLP channels; block 1 keeps one query head per KV group."""
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    channels = torch.arange(0, mlp.up_proj.out_features, 2)
    mlp.gate_proj, mlp.up_proj = _slice(mlp.gate_proj, rows=channels), _slice(mlp.up_proj, rows=channels)
    mlp.down_proj = _slice(mlp.down_proj, cols=channels)
    attn = model.model.layers[1].self_attn
    head_dim, groups = attn.head_dim, attn.num_key_value_groups  # 4 query heads, 2 KV heads
    kept = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in range(0, 4, groups)])
    attn.q_proj, attn.o_proj = _slice(attn.q_proj, rows=kept), _slice(attn.o_proj, cols=kept)
    attn.num_key_value_groups = groups - 1
    return model


def random_windows(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor) -> float:
    return model(input_ids=windows, labels=windows).loss.item()


def structure(model: nn.Module) -> dict[str, tuple]:
    return {n: (type(m), tuple(p.shape for p in m.parameters(recurse=False))) for n, m in model.named_modules()}


def test_shrunk_model_has_different_widths_and_runs():
    model = shrunk_llama()
    widths = {n: m.weight.shape for n, m in prunable_layers(model).items()}
    assert widths["model.layers.0.mlp.up_proj"] != widths["model.layers.1.mlp.up_proj"]
    assert widths["model.layers.1.self_attn.q_proj"] != widths["model.layers.0.self_attn.q_proj"]
    assert math.isfinite(mean_loss(model, random_windows()))


def test_lora_reduces_training_loss_and_merges_back():
    model, windows = shrunk_llama(), random_windows()
    before, shape = mean_loss(model, windows), structure(model)
    report = recover(model, windows, tokens=60 * 4 * SEQLEN, lr=1e-2, batch_size=4, progress=False,
                     val_windows=random_windows(2, seed=1))
    assert mean_loss(model, windows) < before - 0.1
    assert structure(model) == shape and type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_modules())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert report.steps == 60 and report.tokens == 60 * 4 * SEQLEN and len(report.losses) == 60
    rank_params = sum(8 * (m.in_features + m.out_features) for m in prunable_layers(model).values())
    assert report.trainable_params == rank_params
    assert math.isfinite(report.val_ppl_before) and math.isfinite(report.val_ppl_after)


def test_full_changes_block_weights_only_and_keeps_shapes():
    model, windows = shrunk_llama(), random_windows()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    shape = structure(model)
    report = recover(model, windows, method="full", tokens=3 * SEQLEN, lr=1e-3, progress=False)
    after = model.state_dict()
    assert report.steps == 3 and structure(model) == shape
    changed = {k for k, v in after.items() if not torch.equal(v, dense[k])}
    assert {"model.layers.0.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"} <= changed
    assert not changed & {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}


def test_lora_with_zero_lr_leaves_logits_identical():
    model, windows = shrunk_llama(), random_windows()
    with torch.no_grad():
        before = model(input_ids=windows).logits
    recover(model, windows, tokens=2 * SEQLEN, lr=0.0, progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, before)


def test_recovery_is_deterministic_given_seed():
    runs = []
    for _ in range(2):
        model = shrunk_llama()
        report = recover(model, random_windows(), tokens=3 * SEQLEN, lr=1e-3, seed=7, progress=False)
        runs.append((report.losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_target_and_low_precision_are_preserved():
    model = shrunk_llama().to(torch.bfloat16)
    report = recover(model, random_windows(), tokens=SEQLEN, target="mlp", progress=False)
    mlp = [m for n, m in prunable_layers(model).items() if ".mlp." in n]
    assert report.trainable_params == sum(8 * (m.in_features + m.out_features) for m in mlp)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "group-lora", "full"])
def test_gradient_checkpointing_trains_the_same_model_and_puts_the_blocks_back(method):
    runs = []
    for checkpointing in (False, True):
        model = shrunk_llama()
        report = recover(model, random_windows(), method=method, tokens=3 * SEQLEN, lr=1e-3, seed=7, progress=False,
                         checkpointing=checkpointing)
        assert report.checkpointing is checkpointing
        assert all("forward" not in block.__dict__ for block in model.model.layers)  # the class's forward again
        runs.append((report.losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_gradient_checkpointing_keeps_only_the_blocks_inputs():
    """What autograd saves for the backward pass: with checkpointing, far less (each block's input only)."""
    from metricgp.recover.loop import checkpointed_blocks

    model = shrunk_llama()
    ids = random_windows()[:1]
    saved = {False: 0, True: 0}
    model.model.embed_tokens.weight.requires_grad_(True)
    for checkpointing in (False, True):
        def pack(t, key=checkpointing):
            saved[key] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with checkpointed_blocks(model) if checkpointing else contextlib.nullcontext():
                model(input_ids=ids).logits.sum()
    assert saved[True] < 0.5 * saved[False]


@pytest.mark.parametrize(("method", "adapter", "frozen"), [
    ("lora", ("lora_",), torch.bfloat16),  # float32 adapters beside the bfloat16 weights: no float32 copy of the model
    ("group-lora", (".A.", ".B."), torch.bfloat16),
    ("full", (), torch.float32),  # trained weights need float32
])
def test_what_trains_in_float32_and_what_stays_in_its_own_dtype(method, adapter, frozen):
    model = shrunk_llama().to(torch.bfloat16)
    seen: dict[str, torch.dtype] = {}

    def dtypes(block, _):  # the last forward's: a training step's (training calls the blocks, not the model)
        seen.clear()
        seen.update({n: p.dtype for n, p in block.named_parameters()})

    handle = model.model.layers[0].register_forward_pre_hook(dtypes)
    recover(model, random_windows(), method=method, tokens=SEQLEN, progress=False)
    handle.remove()
    trained = {n: d for n, d in seen.items() if any(a in n for a in adapter)}
    assert seen and set(trained.values()) == ({torch.float32} if adapter else set())
    assert {d for n, d in seen.items() if n not in trained} == {frozen}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("kwargs", [
    {"method": "qlora", "tokens": 16},
    {"tokens": 0},
    {"tokens": 16, "target": "no_such_layer"},
])
def test_bad_input_is_a_user_error(kwargs):
    with pytest.raises(MetricGPError):
        recover(tiny_model("llama"), random_windows(), progress=False, **kwargs)


def test_empty_windows_are_a_user_error():
    with pytest.raises(MetricGPError, match="train windows"):
        recover(tiny_model("llama"), torch.empty(0, SEQLEN, dtype=torch.long), tokens=16, progress=False)
