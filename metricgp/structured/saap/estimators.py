"""SAAP's importance estimators and their per-batch scores, computed in one gradient pass and cached.

A *structure* is one query head, one KV head or one MLP channel (its coupled rows and columns,
`metricgp.structured.groups`). A calibration batch is one calibration window. For window b an
estimator maps the leaves of every coupled linear

    W        the weight                     g    the gradient of the window's LM loss (signed)
    X        mean x^2 per input feature     G    sqrt(B) |g|  (so E[G_b^2] = E[G^2] of the cached G)

to element scores, which are summed over each structure (vector-wise estimators sum the signed
scores and take |.| of the sum). Only these per-batch structure scores are kept, never per-batch
gradients: (K estimators, B windows, N structures) floats, cached as safetensors under a key of
the statistics' identity (`metricgp.stats.stats_key`) and the estimator set.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from metricgp.data import parse_data_ref
from metricgp.errors import MetricGPError
from metricgp.expr import FormulaError, compile_metric, formula_from_file, resolve_metric, to_functional
from metricgp.fileio import atomic_path
from metricgp.models import cache_root
from metricgp.stats import collect_input_stats, gradients_of, stats_key
from metricgp.structured.groups import Module
from metricgp.structured.importance import REDUCTIONS, module_partial

SAAP_VERSION = 1  # bump when the per-batch scores change meaning, to invalidate old caches
Leaves = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Estimator:
    name: str  # what the user wrote: a registry name, a formula, or a JSON path
    fn: Callable[[Leaves], torch.Tensor]  # leaves -> element scores (shape of W)
    signed: bool = False  # vector-wise: |sum over the structure| instead of a sum of scores
    key: str = ""  # identity for the cache (the formula itself for formulas and files)


ESTIMATORS: dict[str, Estimator] = {
    "taylor-element": Estimator("taylor-element", lambda t: (t["W"] * t["g"]).abs(), key="taylor-element"),
    "taylor-vector": Estimator("taylor-vector", lambda t: t["W"] * t["g"], signed=True, key="taylor-vector"),
    # the built-ins' own formulas (expr.builtins), compiled: equal to |W| and |W|*sqrt(X) in fp32
    **{name: Estimator(name, compile_metric(resolve_metric(name)), key=name) for name in ("magnitude", "wanda")},
}
DEFAULT_ESTIMATORS = ("taylor-element", "taylor-vector", "magnitude", "wanda")


def split_estimators(text: str) -> list[str]:
    """Comma-separated names; commas inside a formula's parentheses do not split."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    return [*items, current.strip()]


def _formula_estimator(name: str, formula: str) -> Estimator:
    tree = resolve_metric(formula)
    return Estimator(name, compile_metric(tree), key=f"formula:{to_functional(tree)}")


def _file_estimator(path: Path) -> Estimator:
    return _formula_estimator(str(path), formula_from_file(path))


def parse_estimator(name: str) -> Estimator:
    """A registry name, a path to a JSON file with a 'formula' key, or a metric formula."""
    if name in ESTIMATORS:
        return ESTIMATORS[name]
    if name.endswith(".json"):
        return _file_estimator(Path(name))
    try:
        return _formula_estimator(name, name)
    except FormulaError:
        raise MetricGPError(f"unknown estimator '{name}' (choose from {', '.join(ESTIMATORS)}, a metric "
                            "formula, or a JSON file with a 'formula' key)") from None


def parse_estimators(names: Sequence[str]) -> list[Estimator]:
    if not names or any(not n for n in names):
        raise MetricGPError(f"estimators must be a non-empty comma-separated list, got {list(names)}")
    if len(set(names)) != len(names):
        raise MetricGPError(f"an estimator is given twice in {', '.join(names)}")
    return [parse_estimator(n) for n in names]


def structure_sizes(modules: list[Module], linears: Mapping[str, nn.Linear]) -> torch.Tensor:
    """Weights pooled per structure (c_j), in layout order: each module's elements, then its KV heads."""
    def per(slices) -> int:
        return sum(s.size * (linears[s.linear].in_features if s.axis == 0 else linears[s.linear].out_features)
                   for s in slices)

    sizes = [[per(m.slices)] * m.n_elements + [per(m.kv_slices)] * m.n_kv for m in modules]
    return torch.tensor([c for row in sizes for c in row], dtype=torch.float64)


def _window_pass(model: nn.Module, linears: dict[str, nn.Linear], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward on one window: the weights' .grad, and X of every linear (returned)."""
    losses = []

    def forward():
        losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss)
        yield

    stats = collect_input_stats(linears, forward(), leaves=["X"])
    losses[0].backward()
    return {n: stats[n]["X"].to(m.weight.device) for n, m in linears.items()}


def _window_scores(modules: list[Module], linears: dict[str, nn.Linear], x: dict[str, torch.Tensor],
                   estimators: list[Estimator], n_batches: int) -> torch.Tensor:
    """(K, N) structure scores of one window, module by module (so G exists for one module at a time)."""
    cols: list[torch.Tensor] = []
    for m in modules:
        leaves = {n: {"W": linears[n].weight.detach(), "X": x[n], "g": linears[n].weight.grad,
                      "G": linears[n].weight.grad.abs() * math.sqrt(n_batches)}
                  for n in {s.linear for s in m.slices + m.kv_slices}}
        rows = []
        for est in estimators:
            part = module_partial(m, {n: est.fn(t) for n, t in leaves.items()}, REDUCTIONS["sum"])
            row = torch.cat([part.value, part.kv_value])
            rows.append(row.abs() if est.signed else row)
        cols.append(torch.stack(rows))
    return torch.cat(cols, dim=1)


def compute_batch_scores(model: nn.Module, modules: list[Module], linears: dict[str, nn.Linear],
                         calib: torch.Tensor, estimators: list[Estimator]) -> torch.Tensor:
    """(K, B, N) per-window structure scores: one forward/backward per calibration window."""

    used = {n: linears[n] for m in modules for n in sorted({s.linear for s in m.slices + m.kv_slices})}
    device = next(model.parameters()).device
    out = []
    with gradients_of(model, used):
        for window in tqdm(calib, desc="saap estimators", unit="win"):
            x = _window_pass(model, used, window.unsqueeze(0).to(device))
            with torch.no_grad():
                out.append(_window_scores(modules, used, x, estimators, len(calib)).cpu())
            for m in used.values():
                m.weight.grad = None
    return torch.stack(out, dim=1)


def scores_key(stats_key: str, estimators: list[Estimator]) -> str:
    payload = json.dumps({"v": SAAP_VERSION, "stats": stats_key, "estimators": [e.key for e in estimators]})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_batch_scores(setup, modules: list[Module], linears: dict[str, nn.Linear],
                        estimators: list[Estimator]) -> tuple[torch.Tensor, bool]:
    """Per-window structure scores from the disk cache, or computed and stored. (scores, was_cached)

    Cached per estimator, so a set that shares estimators with an earlier one (an ablation of
    single estimators after the fused set) only computes the missing ones, in one pass."""

    spec = setup.spec
    base = stats_key(setup.fingerprint, str(parse_data_ref(spec.calib, "calibration")), spec.n_calib,
                     spec.seqlen, spec.seed, True)
    shape = (1, len(setup.calib), int(sum(m.n_elements + m.n_kv for m in modules)))
    paths = {e.key: cache_root() / "saap" / f"{scores_key(base, [e])}.safetensors" for e in estimators}
    rows: dict[str, torch.Tensor] = {}
    for e in estimators:
        if paths[e.key].is_file():
            scores = load_file(str(paths[e.key]))["scores"]
            if tuple(scores.shape) == shape:
                rows[e.key] = scores
    missing = [e for e in estimators if e.key not in rows]
    if missing:
        fresh = compute_batch_scores(setup.model, modules, linears, setup.calib, missing)
        for e, scores in zip(missing, fresh, strict=True):
            rows[e.key] = scores.unsqueeze(0).contiguous()
            with atomic_path(paths[e.key]) as tmp:
                save_file({"scores": rows[e.key]}, str(tmp), metadata={"estimators": json.dumps([e.key])})
    return torch.cat([rows[e.key] for e in estimators]), not missing
