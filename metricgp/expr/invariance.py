"""Is a metric scale-free? Whether the weights it prunes survive a per-layer rescaling of its statistics.

A constant such as GBLM's 100 in `100.0 * G` encodes one model's gradient scale: multiply a layer's
G by 10 (another model, another loss scale) and the same formula prunes other weights. A metric
whose mask is unchanged when every calibration statistic of a layer (X, G, Hinv, ...: every leaf
whose source is not the weight) is multiplied by its own positive factor carries over. The search
prefers such metrics where the fitness ties (`metricgp.search.breeding.rank_key`).

The check is numerical: per-row 50% masks on random layers, before and after rescaling by factors
far from 1. It is deterministic (fixed generator) and cached per formula.
"""

from __future__ import annotations

import functools

import torch

from metricgp.expr.compile import compile_metric
from metricgp.expr.ops import LEAVES
from metricgp.expr.printing import to_functional
from metricgp.expr.tree import Node

_FACTORS = ((1e-2, 31.0), (53.0, 3e-3))  # (first, second) leaf's factor pattern, alternating


def _random_layer(gen: torch.Generator, rows: int = 8, cols: int = 24) -> dict[str, torch.Tensor]:
    stats = {"W": torch.randn(rows, cols, generator=gen)}
    for name, leaf in LEAVES.items():
        if leaf.source == "weight":
            continue
        shape = (1, cols) if leaf.source == "inputs" else (rows, cols)
        stats[name] = torch.rand(shape, generator=gen) * 2.0 + 0.05
    return stats


def _mask(scores: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    keep.scatter_(1, order[:, : scores.shape[1] // 2], True)
    return keep


@functools.lru_cache(maxsize=16384)
def _scale_free(formula: str, node: Node) -> bool:
    fn = compile_metric(node)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        stats = _random_layer(gen)
        base = fn(stats)
        if not torch.isfinite(base).all():
            return False
        before = _mask(base)
        for factors in _FACTORS:
            scaled = dict(stats)
            for i, name in enumerate(n for n in stats if n != "W"):
                scaled[name] = stats[name] * factors[i % len(factors)]
            after = fn(scaled)
            if not torch.isfinite(after).all() or not torch.equal(_mask(after), before):
                return False
    return True


def is_scale_free(node: Node) -> bool:
    """True if the metric's per-row masks do not change when each calibration statistic of a layer
    is multiplied by its own positive factor (checked numerically, cached per formula)."""
    return _scale_free(to_functional(node), node)
