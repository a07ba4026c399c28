"""EvoPress unstructured: one sparsity level per prunable linear, masks from a metric, exact total.

Genes are the linear layers of the decoder blocks; their kind is the layer's name inside its block
(`self_attn.q_proj`, `mlp.down_proj` ...), and all layers of a kind have one shape (checked). Level
L of a layer removes L x k weights from every row (k = round(columns / levels), the lowest scores
of the row first, as Wanda), so one level is the same number of weights (rows x k) in every layer
of a kind and a switch between two layers of one kind keeps the total exact.

The database stores the metric and the steps, plus the prior's cost tables (cumulative sorted
scores per level); masks are recomputed from the cached statistics for the layers that change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metricgp.darwin.levels import Gene, JsonDatabase, LevelSpace
from metricgp.errors import MetricGPError
from metricgp.expr import compile_metric, parse, to_functional
from metricgp.models import find_blocks
from metricgp.prune.engine import DegenerateMetric, layer_scores, mask_layer
from metricgp.prune.patterns import Unstructured

DEFAULT_LEVELS = 20  # 5% steps


@dataclass
class UnstructuredDatabase(JsonDatabase):
    names: list[str]
    kinds: list[str]
    shapes: list[tuple[int, int]]
    per_row: dict[str, int]  # weights removed from each row per level, per kind
    levels: int
    metric: str  # functional formula
    costs: list[list[float]]  # prior: normalised scores removed at each level, per gene

    @property
    def total(self) -> int:
        return sum(r * c for r, c in self.shapes)

    @property
    def space(self) -> LevelSpace:
        genes = []
        for name, kind, (rows, cols) in zip(self.names, self.kinds, self.shapes, strict=True):
            k = self.per_row[kind]
            genes.append(Gene(name, kind, min(self.levels - 1, (cols - 1) // k), rows * k, rows * cols))
        return LevelSpace(tuple(genes), self.total)

    def sparsity_of(self, gene: int, level: int) -> float:
        return level * self.per_row[self.kinds[gene]] / self.shapes[gene][1]

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "kinds": self.kinds, "shapes": [list(s) for s in self.shapes],
                "per_row": self.per_row, "levels": self.levels, "metric": self.metric, "costs": self.costs}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UnstructuredDatabase:
        return cls(list(raw["names"]), list(raw["kinds"]), [tuple(s) for s in raw["shapes"]], dict(raw["per_row"]),
                   raw["levels"], raw["metric"], [list(c) for c in raw["costs"]])

    def disk_report(self, stored_bytes: int, bytes_per_param: int) -> dict[str, Any]:
        full = sum((g.max_level + 1) * g.full * bytes_per_param for g in self.space.genes)
        return {"stored_bytes": stored_bytes, "full_copies_bytes": full, "ratio": full / max(stored_bytes, 1)}


def _kinds(setup) -> tuple[list[str], list[str]]:
    prefix, _ = find_blocks(setup.model)
    names = list(setup.layers)
    return names, [n[len(prefix) + 1 :].split(".", 1)[1] for n in names]


def _scores(metric, setup, name: str) -> torch.Tensor:
    try:
        return layer_scores(metric, setup.dense.weights[name], setup.stats[name], name)
    except DegenerateMetric as err:
        raise MetricGPError(f"the metric cannot rank weights: {err}") from None


def build_unstructured(setup, tree, levels: int = DEFAULT_LEVELS) -> UnstructuredDatabase:
    """Steps per kind, and the prior's cost tables from the metric's scores of the dense weights."""
    if levels < 2:
        raise MetricGPError(f"--levels must be at least 2 for unstructured levels, got {levels}")
    names, kinds = _kinds(setup)
    shapes = [tuple(setup.dense.weights[n].shape) for n in names]
    per_row: dict[str, int] = {}
    for kind in dict.fromkeys(kinds):
        mine = {s for s, k in zip(shapes, kinds, strict=True) if k == kind}
        if len(mine) != 1:
            raise MetricGPError(f"layers '{kind}' have different shapes {sorted(mine)}: no exact level step")
        per_row[kind] = max(1, round(next(iter(mine))[1] / levels))
    metric = compile_metric(tree)
    db = UnstructuredDatabase(names, kinds, shapes, per_row, levels, to_functional(tree), [])
    space = db.space
    raw: list[list[float]] = []
    mean_of: dict[str, list[float]] = {}
    for gene, name in zip(space.genes, names, strict=True):
        s = _scores(metric, setup, name).double()
        k = per_row[gene.kind]
        cum = s.sort(dim=1).values.cumsum(dim=1).sum(dim=0)  # sum over rows of the lowest j+1 scores
        raw.append([0.0] + [float(cum[level * k - 1]) for level in range(1, gene.max_level + 1)])
        mean_of.setdefault(gene.kind, []).append(float(s.abs().mean()))
    scale = {k: (sum(v) / len(v)) or 1.0 for k, v in mean_of.items()}
    db.costs = [[c / scale[g.kind] for c in table] for table, g in zip(raw, space.genes, strict=True)]
    return db


class UnstructuredMasks:
    """Masks the genome's per-layer sparsity on the dense model, recomputing only changed layers."""

    def __init__(self, setup, db: UnstructuredDatabase):
        self.setup = setup
        self.db = db
        self.metric = compile_metric(parse(db.metric))
        self.current = [0] * len(db.names)
        setup.dense.restore()

    def apply(self, genome: Sequence[int]) -> int:
        changed = [i for i, (a, b) in enumerate(zip(genome, self.current, strict=True)) if a != b]
        for i in changed:
            self.mask_layer(self.db.names[i], self.db.sparsity_of(i, genome[i]))
            self.current[i] = int(genome[i])
        return len(changed)

    def mask_layer(self, name: str, sparsity: float) -> None:
        dense = self.setup.dense.weights[name]
        keep = Unstructured(sparsity).mask(_scores(self.metric, self.setup, name))
        mask_layer(self.setup.dense.layers[name], dense, keep)

    def apply_sparsities(self, sparsities: Sequence[float]) -> None:
        """Any per-layer sparsities (baselines: uniform, OWL), off the level grid."""
        for i, (name, s) in enumerate(zip(self.db.names, sparsities, strict=True)):
            self.mask_layer(name, s)
            self.current[i] = -1  # off the grid: re-masked by the next apply

    def reset(self) -> None:
        self.setup.dense.restore()
        self.current = [0] * len(self.db.names)

    def build(self, genome: Sequence[int]):
        raise MetricGPError("in-loop training is for structured pruning: masked weights would grow back "
                            "(leave --train-tokens unset with --unstructured)")
