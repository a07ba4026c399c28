"""Per-layer calibration statistics, the GP's leaves beyond W: whatever `metricgp.expr.ops.LEAVES`
registers with source "inputs" or "gradients". Today, for every prunable linear layer:
  X[j]    = mean over calibration tokens of x_j^2          shape (1, in)   (Wanda uses sqrt(X))
  Hinv[j] = [(XᵀX/n + λI)^-1]_jj                             shape (1, in)   (SparseGPT's denominator)
  G[i,j]  = sqrt(sum over windows of g_ij^2)                shape (out, in) (GBLM-style l2 norm)
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

from metricgp.expr.ops import leaves_from
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


def input_leaf_names(names: Iterable[str] | None = None) -> tuple[str, ...]:
    """The registered leaves computed from layer inputs (all, or those among `names`)."""
    return tuple(leaves_from("inputs", names))


def collect_input_stats(
    layers: dict[str, nn.Linear], run_forward: Iterable[None], leaves: Iterable[str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {leaf: tensor}} for every input leaf of the registry (or those in `leaves`), from
    whatever forward passes `run_forward` performs when iterated."""
    stat_of = leaves_from("inputs", leaves)
    states = {n: {leaf: st.statistic.start((m.in_features,), m.weight.device) for leaf, st in stat_of.items()}
              for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def consume(name: str, x: torch.Tensor) -> None:
        for leaf, state in states[name].items():
            stat_of[leaf].statistic.add(state, x)
        counts[name] += x.shape[0]

    with layer_input_hooks(layers, consume):
        for _ in run_forward:
            pass
    return {n: {leaf: stat_of[leaf].statistic.finish(state, counts[n]).cpu() for leaf, state in per.items()}
            for n, per in states.items()}


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
    model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor, grads: bool = True, desc: str = "stats",
    leaves: Iterable[str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """One pass over the calibration windows: every registered input leaf (or those in `leaves`),
    and the gradient leaves too when `grads`. Model left as it was."""
    device = next(model.parameters()).device
    grad_leaves = leaves_from("gradients", leaves) if grads else {}
    grad_states = {n: {leaf: lf.statistic.start(tuple(m.weight.shape), m.weight.device)
                       for leaf, lf in grad_leaves.items()} for n, m in layers.items()}

    def passes():
        for window in tqdm(calib, desc=desc, unit="win", leave=False):
            ids = window.unsqueeze(0).to(device)
            if grad_leaves:
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                for n, m in layers.items():
                    for leaf, state in grad_states[n].items():
                        grad_leaves[leaf].statistic.add(state, m.weight.grad)
                    m.weight.grad = None
            else:
                with torch.no_grad():
                    model(input_ids=ids)
            yield None

    with gradients_of(model, layers, bool(grad_leaves)):
        out = collect_input_stats(layers, passes(), leaves)
    for n, per in grad_states.items():
        for leaf, state in per.items():
            out[n][leaf] = grad_leaves[leaf].statistic.finish(state, len(calib)).cpu()
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
    """Load statistics from the disk cache, or compute and store them. Returns (stats, was_cached).

    A cache written before a leaf was added to the registry is completed in place: only the
    missing input leaves are computed (a forward-only pass) and the file is rewritten."""
    path = stats_cache_path(key, cache_dir)
    wanted_inputs = set(input_leaf_names())
    if path.is_file():
        stats = _unflatten(load_file(str(path)))
        if set(stats) == set(layers):
            missing = wanted_inputs - set.intersection(*(set(per) for per in stats.values()))
            if not missing:
                return stats, True
            extra = compute_stats(model, layers, calib, grads=False, desc="stats (new leaves)", leaves=missing)
            for n, per in extra.items():
                stats[n].update(per)
            _save(stats, path, 0.0)
            return stats, True
    t0 = time.time()
    stats = compute_stats(model, layers, calib, grads=grads)
    _save(stats, path, time.time() - t0)
    return stats, False


def _save(stats: dict[str, dict[str, torch.Tensor]], path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(_flatten(stats), str(tmp), metadata={"seconds": f"{seconds:.1f}"})
    os.replace(tmp, path)
