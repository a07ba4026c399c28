"""Speed of a causal LM, measured and analytic, and dense vs pruned compared in one run.

Prefill is one forward over a random prompt batch (logits of the last position only, when the
model accepts `logits_to_keep`, as `generate` does). Decode is greedy `generate` with the KV
cache and exactly `decode_tokens` new tokens, timed by a streamer from the first generated token
(the output of the prefill) to the last, so only the `decode_tokens - 1` cached steps count.
Numbers are medians over repeats; `torch.set_num_threads` is left alone.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from metricgp.errors import MetricGPError
from metricgp.models import find_blocks


@dataclass(frozen=True)
class SpeedSettings:
    prompt_len: int = 128
    decode_tokens: int = 32
    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1
    vocab_size: int | None = None  # None: the size of the model's input embedding
    seed: int = 0

    def __post_init__(self):
        if min(self.prompt_len, self.batch_size, self.repeats) < 1 or self.warmup < 0:
            raise MetricGPError("prompt_len, batch_size and repeats must be >= 1 and warmup >= 0")
        if self.decode_tokens < 2:
            raise MetricGPError(f"decode_tokens must be at least 2 (prefill token + decode), got {self.decode_tokens}")


@dataclass(frozen=True)
class Sample:
    prefill_seconds: float
    decode_seconds: float
    generated: int  # new tokens per sequence


class _Clock:
    """A `generate` streamer that only timestamps: the first put is the prompt, then one per token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure_throughput(model: nn.Module, *, prompt_len: int = 128, decode_tokens: int = 32, batch_size: int = 1,
                       repeats: int = 3, warmup: int = 1, vocab_size: int | None = None, seed: int = 0) -> dict:
    """Prefill and decode tokens/s of `model` (medians of `repeats` after `warmup` runs)."""
    settings = SpeedSettings(prompt_len, decode_tokens, batch_size, repeats, warmup, vocab_size, seed)
    return _measure({"model": model}, settings)["model"]


def compare_speed(dense_model: nn.Module, pruned_model: nn.Module, *, dense_attn_widths: list[int] | None = None,
                  pruned_attn_widths: list[int] | None = None, **kw) -> dict:
    """Both models timed in one run, interleaved (dense, pruned, dense, ...) to cancel drift.

    Speedups are pruned/dense tokens/s; param and FLOP ratios are dense/pruned (FLOPs of one
    `prompt_len` forward, see `forward_flops`). `kw` are the `measure_throughput` settings.
    """
    settings = SpeedSettings(**kw)
    speed = _measure({"dense": dense_model, "pruned": pruned_model}, settings)
    widths = {"dense": dense_attn_widths, "pruned": pruned_attn_widths}
    for name, model in (("dense", dense_model), ("pruned", pruned_model)):
        speed[name]["params"] = count_params(model)
        speed[name]["flops"] = forward_flops(model, settings.prompt_len, widths[name])
    dense, pruned = speed["dense"], speed["pruned"]
    return {
        "prefill_speedup": pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        "decode_speedup": pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "param_ratio": dense["params"]["total"] / pruned["params"]["total"],
        "flops_ratio": dense["flops"] / pruned["flops"],
        **speed,
    }


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and decoder-block parameter counts, and bytes; tied (shared) weights count once."""
    params = list(model.parameters())  # nn.Module yields a shared parameter once
    return {
        "total": sum(p.numel() for p in params),
        "blocks": sum(p.numel() for p in find_blocks(model)[1].parameters()),
        "bytes": sum(p.numel() * p.element_size() for p in params),
    }


def forward_flops(model: nn.Module, seqlen: int, attn_widths: list[int] | None = None) -> float:
    """Analytic FLOPs of one forward over `seqlen` tokens.

    Linear term: 2 * in * out * seqlen for every nn.Linear in the model, lm_head included (biases,
    norms, activations and embedding lookups are ignored). Attention term, only when
    `attn_widths` (query heads * head_dim, one per decoder block) is given: 2 * 2 * seqlen² *
    width per block for the score and value matmuls (full square, causal masking not discounted).
    Without widths the attention matmuls are left out: which linear feeds attention cannot be
    told generically, so structure discovery passes the widths.
    """

    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    if attn_widths is None:
        return float(linear * seqlen)
    n_blocks = len(find_blocks(model)[1])
    if len(attn_widths) != n_blocks:
        raise MetricGPError(f"attn_widths has {len(attn_widths)} entries for {n_blocks} decoder blocks")
    return float(linear * seqlen + 4 * seqlen**2 * sum(attn_widths))


def _measure(models: dict[str, nn.Module], settings: SpeedSettings) -> dict[str, dict]:
    """Time every model on the same prompt, interleaved within each repeat."""
    first = next(iter(models.values()))
    vocab = settings.vocab_size or first.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, vocab, (settings.batch_size, settings.prompt_len), generator=gen)
    samples: dict[str, list[Sample]] = {name: [] for name in models}
    for run in range(settings.warmup + settings.repeats):
        for name, model in models.items():
            sample = _time_once(model, ids, settings.decode_tokens)
            if run >= settings.warmup:
                samples[name].append(sample)
    return {name: _summary(runs, settings) for name, runs in samples.items()}


@torch.inference_mode()
def _time_once(model: nn.Module, ids: torch.Tensor, decode_tokens: int) -> Sample:
    device = next(model.parameters()).device
    ids = ids.to(device)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, **last_only)
    _sync(device)
    prefill = time.perf_counter() - start
    clock = _Clock()
    pad = model.generation_config.pad_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                         max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, streamer=clock,
                         pad_token_id=0 if pad is None else pad)
    return Sample(prefill, clock.times[-1] - clock.times[1], out.shape[1] - ids.shape[1])


def _summary(runs: list[Sample], settings: SpeedSettings) -> dict:
    prefill = statistics.median(r.prefill_seconds for r in runs)
    decode = statistics.median(r.decode_seconds for r in runs)
    decoded = settings.batch_size * (settings.decode_tokens - 1)
    return {
        "prefill_tokens_per_s": settings.batch_size * settings.prompt_len / prefill,
        "decode_tokens_per_s": decoded / decode,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "generated_tokens": min(r.generated for r in runs),
        "prompt_len": settings.prompt_len,
        "decode_tokens": settings.decode_tokens,
        "batch_size": settings.batch_size,
        "repeats": settings.repeats,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: nn.Module) -> str:
    """The name of the KV cache in `forward` and in its output: transformers 5.25 calls it
    `cache` (`past_key_values` is deprecated there, to go in 5.40); earlier releases only know the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm"})


@torch.inference_mode()
def decode_op_profile(model: nn.Module, *, prompt_len: int = 128, steps: int = 16, seed: int = 0) -> dict:
    """Where one cached decode step spends its time (torch.profiler, self time per op): matrix
    products, whose cost shrinks with the pruned widths, against everything else (elementwise ops,
    KV-cache concatenation, norms, dispatch), whose count does not. Explains a decode speed-up
    below the FLOPs ratio; absolute times include the profiler's own overhead."""

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    cache_arg = _cache_argument(model)
    out = model(input_ids=ids, use_cache=True)
    cache, token = getattr(out, cache_arg), out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
            cache, token = getattr(out, cache_arg), out.logits[:, -1:].argmax(-1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return {"steps": steps, "prompt_len": prompt_len, "ms_per_step": total / steps / 1e3,
            "matmul_ms_per_step": matmul / steps / 1e3, "other_ms_per_step": (total - matmul) / steps / 1e3,
            "matmul_share": matmul / total if total else float("nan")}


def decode_breakdown(dense_model: nn.Module, pruned_model: nn.Module, repeats: int = 1, **kw) -> dict:
    """`decode_op_profile` of both models, and the decode speed-up the matrix products alone would
    give if everything else stayed as in the dense model (Amdahl). With `repeats` > 1 the two are
    profiled alternately (dense, pruned, dense, ...) so load on a shared machine hits both alike,
    every figure is the median over repeats, and `spread` gives the min and max of the ratios."""

    runs = []
    for _ in range(max(repeats, 1)):
        dense, pruned = decode_op_profile(dense_model, **kw), decode_op_profile(pruned_model, **kw)
        runs.append({"dense": dense, "pruned": pruned,
                     "profiled_speedup": dense["ms_per_step"] / pruned["ms_per_step"],
                     "matmul_speedup": dense["matmul_ms_per_step"] / pruned["matmul_ms_per_step"],
                     "amdahl_bound": dense["ms_per_step"]
                     / (dense["other_ms_per_step"] + pruned["matmul_ms_per_step"])})
    if len(runs) == 1:
        return runs[0]

    def median_of(side: str) -> dict:
        return {k: statistics.median(r[side][k] for r in runs) for k in runs[0][side]}

    ratios = ("profiled_speedup", "matmul_speedup", "amdahl_bound")
    return {"dense": median_of("dense"), "pruned": median_of("pruned"), "repeats": len(runs),
            **{k: statistics.median(r[k] for r in runs) for k in ratios},
            "spread": {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in ratios}}
