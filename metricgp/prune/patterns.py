"""Sparsity patterns: scores -> boolean keep-mask, with the achieved sparsity exact.

Each pattern is a small class with `mask(scores) -> keep`. Lower scores are pruned first.
Ties are broken by position (stable sort), and NaN scores count as the lowest, so masks are
deterministic. Add a pattern by writing a class and one `PATTERNS` entry.

`parse_pattern` is the one place a pattern's text is parsed and validated (every command line
goes through it): a pattern that fixes its own sparsity (N:M) refuses a different explicit one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from metricgp.errors import MetricGPError


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of each row along the last dim, keepdim; exact.

    On the CPU numpy's introselect (np.partition) is ~4x faster than torch.kthvalue, which also
    tracks indices we do not need; rows are split across torch's threads (numpy releases the GIL).
    Elsewhere (CUDA) torch.kthvalue."""
    if values.device.type != "cpu" or values.dim() != 2 or values.dtype not in (torch.float32, torch.float64):
        return values.kthvalue(k, dim=-1, keepdim=True).values
    array = values.detach().numpy()
    threads = min(torch.get_num_threads(), max(values.shape[0] // 64, 1))
    if threads <= 1 or values.numel() < (1 << 18):
        return torch.from_numpy(np.partition(array, k - 1, axis=-1)[:, k - 1 : k])
    bounds = np.linspace(0, array.shape[0], threads + 1).astype(int)
    out = np.empty((array.shape[0], 1), dtype=array.dtype)

    def part(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        out[lo:hi] = np.partition(array[lo:hi], k - 1, axis=-1)[:, k - 1 : k]

    list(thread_pool(threads).map(part, range(threads)))
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=4)
def thread_pool(threads: int) -> ThreadPoolExecutor:
    """One executor per thread count, for work that releases the GIL: the k-th selection's row blocks here and
    `DenseWeights.restore`'s file reads (called one after the other, never at once)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="metricgp")


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that drops the k lowest entries along the last dim (NaN lowest; among equal
    scores the earliest positions go first, as a stable sort would order them).

    A k-th value threshold (kth_smallest) plus, only for rows with ties at the threshold, a
    cumulative count of the tied entries: a fraction of a full sort, in the search's hot path.
    """
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    clean = scores.float()
    # a NaN anywhere makes the sum NaN (a false alarm from overflow only costs the nan_to_num pass);
    # a reduction without a boolean temporary is the cheaper test in the hot path
    if torch.isnan(clean.sum()):
        clean = torch.nan_to_num(clean, nan=float("-inf"))
    threshold = kth_smallest(clean, k)
    keep = clean > threshold
    if bool((keep.sum(dim=-1) == clean.shape[-1] - k).all()):  # no row has surplus ties (the usual case)
        return keep
    below = clean < threshold
    tied = clean == threshold
    need = k - below.sum(dim=-1, keepdim=True)  # how many of the tied entries must go
    tie_rank = tied.cumsum(dim=-1, dtype=torch.int32)
    return ~(below | (tied & (tie_rank <= need)))


@dataclass(frozen=True)
class Unstructured:
    """Drop a fraction of weights; compared within each output row (Wanda) or across the layer."""

    # The simplification scope (metricgp.expr.simplify.SCOPES) whose rewrites keep these masks:
    # the scores of one tensor are ranked, so affine root transforms cannot change the mask.
    simplify_scope: ClassVar[str] = "tensor"

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

    @property
    def setting(self) -> str:
        """The compact text `parse_setting` reads back: '0.5' (per row) or 'unstructured-layer@0.5'."""
        return f"{self.sparsity:g}" if self.scope == "row" else f"{self.name}@{self.sparsity:g}"

    @property
    def label(self) -> str:
        return f"{self.sparsity:.0%}" + ("" if self.scope == "row" else " layer")


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: drop the n lowest of every m consecutive inputs."""

    simplify_scope: ClassVar[str] = "tensor"  # each group of m ranks scores of one tensor

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

    @property
    def setting(self) -> str:
        return self.name

    @property
    def label(self) -> str:
        return self.name


Pattern = Unstructured | NM


def check_sparsity(sparsity: float) -> float:
    if not (0.0 < sparsity < 1.0):
        raise MetricGPError(f"sparsity must be strictly between 0 and 1, got {sparsity}")
    return sparsity


@dataclass(frozen=True)
class PatternKind:
    """One entry of `PATTERNS`: the text it accepts and how that text becomes a pattern.

    syntax:          a regular expression the lower-cased text must match in full.
    build:           (match, sparsity) -> pattern; sparsity is None only for kinds that fix it.
    fixes_sparsity:  the pattern's text fixes its sparsity (N:M): an explicit different sparsity
                     is an error, and no default sparsity is applied.
    example:         for help texts and error messages.
    """

    syntax: str
    build: Callable[[re.Match, float | None], Pattern]
    fixes_sparsity: bool = False
    example: str = ""


def _unstructured(scope: str) -> Callable[[re.Match, float | None], Pattern]:
    def build(match: re.Match, sparsity: float | None) -> Pattern:
        if sparsity is None:
            raise MetricGPError(f"pattern '{match[0]}' needs a sparsity")
        return Unstructured(check_sparsity(sparsity), scope)

    return build


def _nm(match: re.Match, sparsity: float | None) -> Pattern:
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise MetricGPError(f"bad N:M pattern '{match[0]}': need 0 < N < M")
    if sparsity is not None and abs(sparsity - n / m) > 1e-9:
        raise MetricGPError(f"pattern {match[0]} fixes sparsity at {n / m:g}; got --sparsity {sparsity:g} "
                            f"(drop --sparsity or give {n / m:g})")
    return NM(n, m)


# kind name -> how to parse it; one entry adds a pattern to every command line.
PATTERNS: dict[str, PatternKind] = {
    "unstructured": PatternKind(r"unstructured(?:-row)?", _unstructured("row"), example="unstructured"),
    "unstructured-layer": PatternKind(r"unstructured-layer", _unstructured("layer"), example="unstructured-layer"),
    "N:M": PatternKind(r"(\d+):(\d+)", _nm, fixes_sparsity=True, example="2:4, 4:8"),
}


def pattern_help() -> str:
    return ", ".join(f"{name} (e.g. {kind.example})" if kind.example != name else name
                     for name, kind in PATTERNS.items())


def parse_pattern(text: str, sparsity: float | None = None, default_sparsity: float | None = None) -> Pattern:
    """A pattern from its text ('unstructured', 'unstructured-layer', 'N:M' ...), validated once.

    `sparsity` is what the user gave explicitly (None: nothing); `default_sparsity` is used for a
    pattern that needs one when none was given. A pattern that fixes its own sparsity (N:M) refuses
    an explicit different one and ignores the default."""
    clean = text.strip().lower()
    for kind in PATTERNS.values():
        match = re.fullmatch(kind.syntax, clean)
        if match:
            if sparsity is None and not kind.fixes_sparsity:
                sparsity = default_sparsity
            return kind.build(match, sparsity)
    raise MetricGPError(f"unknown pattern '{clean}' (choose from {pattern_help()})")


def parse_setting(text: str) -> Pattern:
    """A comparison setting: a bare sparsity ('0.5': unstructured per row), 'PATTERN@SPARSITY'
    ('unstructured-layer@0.5'), or a pattern that fixes its sparsity ('2:4'). `Pattern.setting`
    writes it back."""
    name, at, value = text.strip().partition("@")
    try:
        sparsity = float(value if at else name)
    except ValueError:
        if at:
            raise MetricGPError(f"bad sparsity '{value}' in setting '{text}'") from None
        return parse_pattern(name)
    return parse_pattern(name if at else "unstructured", sparsity)
