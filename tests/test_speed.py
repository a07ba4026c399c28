"""Parameter counts, analytic FLOPs and measured throughput on tiny random models (no timing asserts)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config, tiny_model
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.structured.speed import compare_speed, count_params, forward_flops, measure_throughput

HIDDEN, INTERMEDIATE, VOCAB, BLOCKS = 32, 64, 300, 2


def halve_mlps(model: nn.Module) -> nn.Module:
    """Every block keeps the first half of its MLP channels."""
    for block in model.model.layers:
        mlp, half = block.mlp, INTERMEDIATE // 2
        for name in ("gate_proj", "up_proj"):
            new = nn.Linear(HIDDEN, half, bias=False)
            new.weight.data = getattr(mlp, name).weight.data[:half].clone()
            setattr(mlp, name, new)
        down = nn.Linear(half, HIDDEN, bias=False)
        down.weight.data = mlp.down_proj.weight.data[:, :half].clone()
        mlp.down_proj = down
    return model


def test_count_params_counts_tied_embeddings_once():
    from transformers import AutoModelForCausalLM

    untied = count_params(tiny_model("llama"))
    config = tiny_config("llama", VOCAB)
    config.tie_word_embeddings = True
    tied_model = AutoModelForCausalLM.from_config(config)
    tied = count_params(tied_model)
    assert tied_model.lm_head.weight is tied_model.model.embed_tokens.weight
    assert tied["total"] == untied["total"] - VOCAB * HIDDEN
    assert tied["blocks"] == untied["blocks"] == sum(p.numel() for p in tied_model.model.layers.parameters())
    assert tied["bytes"] == 4 * tied["total"]


def test_count_params_of_bf16_model_in_bytes():
    model = tiny_model("llama").to(torch.bfloat16)
    counts = count_params(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) and counts["bytes"] == 2 * counts["total"]


def test_halving_mlp_width_removes_exactly_half_the_mlp_linear_flops():
    seqlen = 64
    dense = forward_flops(tiny_model("llama"), seqlen)
    pruned = forward_flops(halve_mlps(tiny_model("llama")), seqlen)
    mlp_flops = BLOCKS * 3 * 2 * HIDDEN * INTERMEDIATE * seqlen
    assert dense - pruned == mlp_flops / 2
    attention_projections = BLOCKS * 2 * seqlen * HIDDEN * (32 + 16 + 16 + 32)  # q, k, v, o (2 KV heads)
    assert dense == mlp_flops + attention_projections + 2 * seqlen * HIDDEN * VOCAB


def test_attention_term_needs_one_width_per_block():
    model, seqlen = tiny_model("llama"), 10
    extra = forward_flops(model, seqlen, [32, 16]) - forward_flops(model, seqlen)
    assert extra == 4 * seqlen**2 * (32 + 16)
    with pytest.raises(MetricGPError):
        forward_flops(model, seqlen, [32])


def test_measure_throughput_is_positive_and_decodes_every_token():
    result = measure_throughput(tiny_model("llama"), prompt_len=8, decode_tokens=5, batch_size=2, repeats=2)
    assert result["generated_tokens"] == 5
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_seconds", "decode_seconds"):
        assert math.isfinite(result[key]) and result[key] > 0


def test_compare_speed_reports_ratios_for_a_pruned_model():
    dense, pruned = tiny_model("llama"), halve_mlps(tiny_model("llama"))
    result = compare_speed(dense, pruned, prompt_len=8, decode_tokens=3, repeats=1, warmup=0)
    assert result["param_ratio"] == result["dense"]["params"]["total"] / result["pruned"]["params"]["total"] > 1
    assert result["flops_ratio"] > 1 and result["pruned"]["generated_tokens"] == 3
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("prefill_speedup", "decode_speedup"))


def test_too_few_decode_tokens_is_a_user_error():
    with pytest.raises(MetricGPError):
        measure_throughput(tiny_model("llama"), decode_tokens=1)


def test_decode_breakdown_splits_step_time_into_matmuls_and_the_rest():
    from metricgp.structured.speed import decode_breakdown

    dense, pruned = tiny_model("llama"), halve_mlps(tiny_model("llama"))
    result = decode_breakdown(dense, pruned, prompt_len=8, steps=3)
    for side in ("dense", "pruned"):
        p = result[side]
        assert p["steps"] == 3 and 0 < p["matmul_share"] < 1
        assert p["ms_per_step"] == pytest.approx(p["matmul_ms_per_step"] + p["other_ms_per_step"])
    d, q = result["dense"], result["pruned"]
    bound = d["ms_per_step"] / (d["other_ms_per_step"] + q["matmul_ms_per_step"])
    assert result["amdahl_bound"] == pytest.approx(bound)
    repeated = decode_breakdown(dense, pruned, repeats=3, prompt_len=8, steps=2)
    assert repeated["repeats"] == 3 and repeated["dense"]["steps"] == 2
    for key, (lo, hi) in repeated["spread"].items():
        assert lo <= repeated[key] <= hi
