"""Per-layer calibration statistics, the GP's leaves: X (activations) and G (gradients).

For every prunable linear layer:
  X[j]   = mean over calibration tokens of x_j^2          shape (1, in)   (Wanda uses sqrt(X))
  G[i,j] = sqrt(sum over windows of g_ij^2)                shape (out, in) (GBLM-style l2 norm)
where g is the gradient of the causal-LM loss of one window on the dense model. W is read from
the model itself. The pass runs in float32 (bf16 gradients underflow) and the result is cached on
disk as safetensors under a key of model weights + data + windows + seqlen + seed, so a second
run loads in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from metricgp.models import cache_root

STATS_VERSION = 1  # bump when the definition of X or G changes, to invalidate old caches


def stats_key(fingerprint: str, data: str, n_windows: int, seqlen: int, seed: int, grads: bool) -> str:
    payload = json.dumps(
        {"v": STATS_VERSION, "model": fingerprint, "data": data, "n": n_windows, "seqlen": seqlen,
         "seed": seed, "grads": grads},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@contextmanager
def layer_input_hooks(layers: dict[str, nn.Linear], consume: Callable[[str, torch.Tensor], None]):
    """While active, call consume(name, x) with each layer's input as float32 (tokens, in_features)."""

    def hook_for(name: str):
        def hook(_module, args, _output):
            consume(name, args[0].detach().reshape(-1, args[0].shape[-1]).float())

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_sq_norm_hooks(layers: dict[str, nn.Linear], sums: dict[str, torch.Tensor], counts: dict[str, int]):
    """Accumulate sum of x^2 per input feature and the token count for every layer while active."""

    def consume(name: str, x: torch.Tensor) -> None:
        sums[name] += x.square().sum(dim=0)
        counts[name] += x.shape[0]

    return layer_input_hooks(layers, consume)


def collect_activation_stats(
    layers: dict[str, nn.Linear], run_forward: Iterable[None]
) -> dict[str, torch.Tensor]:
    """X for each layer, from whatever forward passes `run_forward` performs when iterated."""
    sums = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)
    with input_sq_norm_hooks(layers, sums, counts):
        for _ in run_forward:
            pass
    return {n: (sums[n] / max(counts[n], 1)).unsqueeze(0).cpu() for n in layers}


@contextmanager
def gradients_of(model: nn.Module, linears: dict[str, nn.Linear], grads: bool = True):
    """The model in float32 (bf16 gradients underflow) with gradients for the linears' weights
    only (none when not `grads`); dtype, flags and .grad restored afterwards."""
    dtype = next(model.parameters()).dtype
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(grads)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.to(dtype)


def compute_stats(
    model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor, grads: bool = True, desc: str = "stats"
) -> dict[str, dict[str, torch.Tensor]]:
    """One pass over the calibration windows: X always, G when `grads`. Model left as it was."""
    device = next(model.parameters()).device
    grad_sq = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()} if grads else {}

    def passes():
        for window in tqdm(calib, desc=desc, unit="win", leave=False):
            ids = window.unsqueeze(0).to(device)
            if grads:
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                for n, m in layers.items():
                    grad_sq[n] += m.weight.grad.float().square()
                    m.weight.grad = None
            else:
                with torch.no_grad():
                    model(input_ids=ids)
            yield None

    with gradients_of(model, layers, grads):
        x_stats = collect_activation_stats(layers, passes())
    out = {n: {"X": x_stats[n]} for n in layers}
    for n in grad_sq:
        out[n]["G"] = grad_sq[n].sqrt().cpu()
    return out


def stats_cache_path(key: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root() / "stats") / f"{key}.safetensors"


def _flatten(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{layer}|{leaf}": t.contiguous() for layer, d in stats.items() for leaf, t in d.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        layer, leaf = key.rsplit("|", 1)
        out.setdefault(layer, {})[leaf] = t
    return out


def cached_stats(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    calib: torch.Tensor,
    key: str,
    grads: bool = True,
    cache_dir: Path | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], bool]:
    """Load statistics from the disk cache, or compute and store them. Returns (stats, was_cached)."""
    path = stats_cache_path(key, cache_dir)
    if path.is_file():
        stats = _unflatten(load_file(str(path)))
        if set(stats) == set(layers):
            return stats, True
    t0 = time.time()
    stats = compute_stats(model, layers, calib, grads=grads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(_flatten(stats), str(tmp), metadata={"seconds": f"{time.time() - t0:.1f}"})
    os.replace(tmp, path)
    return stats, False
