"""OWL (Yin et al. 2023, outlier-weighted layerwise sparsity): the EvoPress baseline.

Per decoder block, the outlier ratio D is the fraction of Wanda scores |W_ij| * ||X_j|| above M
times the block's mean score (all its linears together). Ratios are min-max scaled to [0, 2*lam],
centred, and a block keeps (1 - sparsity) + its centred value: blocks with more outliers are pruned
less, the mean sparsity stays the target, and every block is within sparsity +- lam. The defaults
are the authors' (M = 5, lam = 0.08).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metricgp.expr import compile_metric, resolve_metric
from metricgp.models import find_blocks
from metricgp.prune.engine import metric_inputs

OWL_M = 5.0
OWL_LAMBDA = 0.08
_WANDA = compile_metric(resolve_metric("wanda"))  # OWL's outlier scores are the built-in wanda metric's


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Per-block sparsity from outlier ratios (the allocation of OWL's released code)."""
    r = torch.tensor(list(ratios), dtype=torch.float64)
    span = float(r.max() - r.min())
    scaled = (r - r.min()) * (2 * lam / span) if span > 0 else torch.zeros_like(r)
    keep = scaled - scaled.mean() + (1 - sparsity)
    return [float(1 - k) for k in keep]


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """Fraction of the scores (all tensors together) above m x their mean."""
    flat = torch.cat([s.detach().flatten().double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def block_outlier_ratios(setup, m: float = OWL_M) -> list[float]:
    """Wanda-score outlier ratio of every decoder block, from the cached statistics."""
    prefix, blocks = find_blocks(setup.model)
    out = []
    for i in range(len(blocks)):
        names = [n for n in setup.layers if n.startswith(f"{prefix}.{i}.")]
        out.append(outlier_ratio([wanda_scores(setup.dense.weights[n], setup.stats[n]) for n in names], m))
    return out


def wanda_scores(weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The built-in wanda metric's scores of one layer, on the weight's device (the statistics are kept
    on the host while the weights may be on a GPU)."""
    return _WANDA(metric_inputs(_WANDA, weight, stats))


def owl_layer_sparsities(setup, sparsity: float, m: float = OWL_M, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL's sparsity of every prunable linear (its block's), in `setup.layers` order."""
    prefix, _ = find_blocks(setup.model)
    per_block = owl_sparsities(block_outlier_ratios(setup, m), sparsity, lam)
    return [per_block[int(n[len(prefix) + 1 :].split(".", 1)[0])] for n in setup.layers]
