"""The metric prior: what the database's structure importances predict before any forward pass.

Every gene gets a cost table: cost[g][L] = normalised importance of what level L removes (unit
importances divided by the mean |importance| of their kind, so genes of one kind compare). Then

- predicted loss of a genome = sum of its genes' costs (offspring are screened by it, and only the
  most promising reach the KL stage; `metricgp.ranking.spearman` checks the prediction against measured KL);
- mutation bias: a gene goes up with probability proportional to its rank by the cost of its next
  level (cheapest first), down by the cost of its current level (dearest first); linear rank
  weights, so every eligible gene keeps a chance;
- the start genome (structured): the global allocation of units by importance for the same budget,
  rounded to levels (`allocation_start`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metricgp.darwin.levels import Genome
from metricgp.structured.allocate import allocate


def _rank_weights(values: Sequence[float], dearest_first: bool) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: (-values[i] if dearest_first else values[i], i))
    weights = [0.0] * len(values)
    for rank, i in enumerate(order):
        weights[i] = float(len(values) - rank)
    return weights


@dataclass
class MetricPrior:
    costs: list[list[float]]  # per gene, levels 0..max

    def predicted(self, genome: Sequence[int]) -> float:
        return sum(self.costs[g][level] for g, level in enumerate(genome))

    def up(self, genome: Sequence[int], genes: Sequence[int]) -> list[float]:
        return _rank_weights([self.costs[g][genome[g] + 1] - self.costs[g][genome[g]] for g in genes], False)

    def down(self, genome: Sequence[int], genes: Sequence[int]) -> list[float]:
        return _rank_weights([self.costs[g][genome[g]] - self.costs[g][genome[g] - 1] for g in genes], True)

    def screen(self, children: Sequence[Genome], keep: int) -> list[Genome]:
        """The `keep` children with the lowest predicted loss (ties: the earlier child)."""
        order = sorted(range(len(children)), key=lambda i: (self.predicted(children[i]), i))
        return [children[i] for i in sorted(order[:keep])]


def cumulative(unit_costs: Sequence[float], step: int, max_level: int) -> list[float]:
    out, acc = [0.0], 0.0
    for level in range(1, max_level + 1):
        acc += sum(unit_costs[(level - 1) * step : level * step])
        out.append(acc)
    return out


def structured_prior(db) -> MetricPrior:
    """Cost tables from a structured `LevelDatabase`: unit `norm` over its kind's mean |norm|."""
    space = db.space
    scale: dict[str, float] = {}
    for kind, idx in space.kinds().items():
        norms = [abs(u.norm) for i in idx for u in db.order[i]]
        scale[kind] = (sum(norms) / len(norms)) or 1.0
    costs = []
    for i, gene in enumerate(space.genes):
        unit_costs = [u.norm / scale[gene.kind] for u in db.order[i]]
        costs.append(cumulative(unit_costs, db.step_units[gene.kind], gene.max_level))
    return MetricPrior(costs)


def allocation_start(db, budget: int) -> tuple[list[float], dict[str, float]]:
    """Per-gene weights and per-kind parameter targets from the global allocation of the units by
    importance (`metricgp.structured.allocate`): the structured start genome of the prior."""

    removed = allocate([u for units in db.order for u in units], budget, "global")
    per_module: dict[str, int] = {}
    for u in removed:
        per_module[u.module] = per_module.get(u.module, 0) + u.params
    weights = [float(per_module.get(n, 0)) for n in db.names]
    kinds: dict[str, float] = {}
    for kind, w in zip(db.kinds, weights, strict=True):
        kinds[kind] = kinds.get(kind, 0.0) + w
    return weights, kinds
