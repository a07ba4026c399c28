"""Sparsity patterns: scores -> boolean keep-mask, with the achieved sparsity exact.

Each pattern is a small class with `mask(scores) -> keep`. Lower scores are pruned first.
Ties are broken by position (stable sort), and NaN scores count as the lowest, so masks are
deterministic. Add a pattern by writing a class and one `PATTERNS` entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from metricgp.errors import MetricGPError


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that drops the k lowest entries along the last dim (NaN lowest; among equal
    scores the earliest positions go first, as a stable sort would order them).

    A k-th value threshold plus a cumulative count of ties costs a fraction of a full sort
    (measured 1.7 s vs 2.9-4.2 s over SmolLM2-135M's layers), which matters in the search's hot path.
    """
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    clean = scores.float()
    if torch.isnan(clean).any():
        clean = torch.nan_to_num(clean, nan=float("-inf"))
    threshold = clean.kthvalue(k, dim=-1, keepdim=True).values
    below = clean < threshold
    tied = clean == threshold
    need = k - below.sum(dim=-1, keepdim=True)  # how many of the tied entries must go
    tie_rank = tied.cumsum(dim=-1, dtype=torch.int32)
    return ~(below | (tied & (tie_rank <= need)))


@dataclass(frozen=True)
class Unstructured:
    """Drop a fraction of weights; compared within each output row (Wanda) or across the layer."""

    sparsity: float
    scope: str = "row"  # "row" | "layer"

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self.scope == "row":
            return _prune_lowest(scores, round(self.sparsity * scores.shape[-1]))
        flat = scores.reshape(1, -1)
        return _prune_lowest(flat, round(self.sparsity * flat.numel())).view_as(scores)

    @property
    def name(self) -> str:
        return "unstructured" if self.scope == "row" else "unstructured-layer"


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: drop the n lowest of every m consecutive inputs."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] % self.m:
            raise MetricGPError(f"{self.name}: input dimension {scores.shape[-1]} is not a multiple of {self.m}")
        groups = scores.reshape(*scores.shape[:-1], -1, self.m)
        return _prune_lowest(groups, self.n).view_as(scores)

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = Unstructured | NM
PATTERNS = ("unstructured", "unstructured-layer", "N:M (e.g. 2:4, 4:8)")


def check_sparsity(sparsity: float) -> float:
    if not (0.0 < sparsity < 1.0):
        raise MetricGPError(f"sparsity must be strictly between 0 and 1, got {sparsity}")
    return sparsity


def parse_pattern(text: str, sparsity: float | None = None) -> Pattern:
    """'unstructured' | 'unstructured-layer' | 'N:M' -> a pattern, validated once."""
    text = text.strip().lower()
    if text in ("unstructured", "unstructured-row", "unstructured-layer"):
        if sparsity is None:
            raise MetricGPError(f"pattern '{text}' needs a sparsity")
        return Unstructured(check_sparsity(sparsity), "layer" if text.endswith("layer") else "row")
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match:
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise MetricGPError(f"bad N:M pattern '{text}': need 0 < N < M")
        if sparsity is not None and abs(sparsity - n / m) > 1e-9:
            raise MetricGPError(f"pattern {text} fixes sparsity at {n / m:g}; got --sparsity {sparsity}")
        return NM(n, m)
    raise MetricGPError(f"unknown pattern '{text}' (choose from {', '.join(PATTERNS)})")
