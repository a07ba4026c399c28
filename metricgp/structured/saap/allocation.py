"""SAAP's adaptive structure search: per-module ratios from importance and stability, as a keep map.

The equations (S_m, A_m, rho_m, pi_m, water-filling) are in `metricgp.structured.saap`.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping

import torch

from metricgp.errors import MetricGPError
from metricgp.structured.importance import Unit, by_module
from metricgp.structured.saap import Analysis, SAAPOptions, analyse


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ascending ranks from 0, ties averaged."""
    less = (values[None, :] < values[:, None]).sum(1).double()
    equal = (values[None, :] == values[:, None]).sum(1).double()
    return less + (equal - 1) / 2


def module_signals(a: Analysis, modules: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_m, S_m) per module: importance and stability indicator over its elements."""
    importance, stability = [], []
    for m in modules:
        start, n, _ = a.offsets[m.name]
        f, c = a.fused[:, start:start + n], a.sizes[start:start + n]
        mean = f.mean(0)
        importance.append(float((mean * c).sum() / c.sum()))
        stability.append(float(f.std(0, unbiased=False).mean() / mean.mean()) if mean.mean() > 0 else 0.0)
    return torch.tensor(importance, dtype=torch.float64), torch.tensor(stability, dtype=torch.float64)


def propensities(importance: torch.Tensor, stability: torch.Tensor, spread: float) -> torch.Tensor:
    """pi_m = 1 + spread (1 - 2 rho_m): low importance and low fluctuation -> pruned more."""
    m = len(importance)
    rho = (_ranks(importance) + _ranks(stability)) / (2 * max(m - 1, 1))
    return 1 + spread * (1 - 2 * rho)


def water_fill(units: list[Unit], budget: int, weight: Mapping[str, float]) -> dict[str, int]:
    """Units removed per module: removed fractions grow in proportion to `weight` (modules with no
    or zero weight are untouched) while the removed parameters stay within `budget`."""
    grouped = by_module(units)
    size = {m: sum(u.params for u in us) for m, us in grouped.items()}
    removed = dict.fromkeys(grouped, 0)
    gone = dict.fromkeys(grouped, 0)
    heap = [(us[0].params / (size[m] * weight[m]), m) for m, us in grouped.items()
            if weight.get(m, 0) > 0 and len(us) > 1]
    heapq.heapify(heap)
    while heap:
        _, m = heapq.heappop(heap)
        params = grouped[m][removed[m]].params
        if params > budget:
            continue  # this module's units no longer fit; smaller ones elsewhere may
        budget -= params
        removed[m] += 1
        gone[m] += params
        if removed[m] < len(grouped[m]) - 1:
            heapq.heappush(heap, ((gone[m] + grouped[m][removed[m]].params) / (size[m] * weight[m]), m))
    return removed


def stability_keep_map(pruner, units: list[Unit], spec) -> dict[str, float]:
    """The keep map of the adaptive structure search (`PLANNERS["stability"]`)."""
    options = SAAPOptions.from_dict(spec.options)
    a = analyse(pruner, options)
    last = max(m.block for m in pruner.modules)
    eligible = [m for m in pruner.modules if not (options.skip_edge_blocks and m.block in (0, last))]
    if not eligible:
        raise MetricGPError("skip_edge_blocks leaves no block to prune (the model has at most two blocks)")
    importance, stability = module_signals(a, eligible)
    pi = propensities(importance, stability, options.spread)
    weight = {m.name: float(p) for m, p in zip(eligible, pi, strict=True)}
    removed = water_fill(units, pruner.budget(spec), weight)
    count = Counter(u.module for u in units)
    keep = {m: (count[m] - removed[m]) / count[m] for m in weight}
    pruner.notes.setdefault("saap", {}).update({"modules": {
        m.name: {"importance": float(importance[i]), "stability": float(stability[i]), "propensity": weight[m.name],
                 "keep": keep[m.name]} for i, m in enumerate(eligible)}})
    return keep
