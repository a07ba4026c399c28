"""Rank statistics shared by the level search (its prior's prediction against KL) and SAAP (each
estimator against the measured probes)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import spearmanr


def spearman(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Spearman's rho of two equally long lists (None: fewer than 3 finite pairs or a constant side)."""
    pairs = [(p, m) for p, m in zip(predicted, measured, strict=True) if math.isfinite(p) and math.isfinite(m)]
    if len(pairs) < 3 or len({p for p, _ in pairs}) < 2 or len({m for _, m in pairs}) < 2:
        return None
    rho = spearmanr([p for p, _ in pairs], [m for _, m in pairs]).statistic
    return float(rho) if math.isfinite(rho) else None
