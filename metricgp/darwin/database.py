"""The structured level database: per attention and MLP module, its units in removal order.

Level L of a module removes its first L x step units (heads in the evaluator's head units, MLP
channels), least important first by the database's metric. Within a module type every module has
the same units of the same size (checked), so one level is the same number of parameters in every
module of that type and a level switch keeps the total exact.

Stored compactly: the importance order of every module's units (members, scores) in JSON, never
weight copies; `disk_report` compares its size with EvoPress-style full-size copies of every level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metricgp.darwin.levels import Gene, Genome, JsonDatabase, LevelSpace
from metricgp.errors import MetricGPError
from metricgp.structured.importance import Unit, by_module

DEFAULT_LEVELS = 10


@dataclass
class LevelDatabase(JsonDatabase):
    names: list[str]  # module names: the genes, in the pruner's module order
    kinds: list[str]  # "attention" | "mlp"
    order: list[list[Unit]]  # units of each module, least important first
    step_units: dict[str, int]  # units removed per level, per kind
    levels: int  # requested levels (max level = min(levels, what keeps one unit))
    total: int  # dense decoder parameters
    module_params: list[int]  # parameters of each module's linears (for the disk comparison)
    meta: dict[str, Any] = field(default_factory=dict)  # how the order was made (metric, reduction ...)

    @property
    def space(self) -> LevelSpace:
        genes = []
        for name, kind, units in zip(self.names, self.kinds, self.order, strict=True):
            step = self.step_units[kind]
            genes.append(Gene(name, kind, min(self.levels, (len(units) - 1) // step), step * units[0].params,
                              len(units) * units[0].params))
        return LevelSpace(tuple(genes), self.total)

    def units_at(self, gene: int, level: int) -> list[Unit]:
        return self.order[gene][: level * self.step_units[self.kinds[gene]]]

    def removed(self, genome: Genome) -> list[Unit]:
        return [u for i, level in enumerate(genome) for u in self.units_at(i, level)]

    def keep_map(self, genome: Genome) -> dict[str, float]:
        """Fraction of units each module keeps (what `apply --structured --keep-map` reads)."""
        return {n: 1 - len(self.units_at(i, lv)) / len(self.order[i]) for i, (n, lv) in enumerate(zip(
            self.names, genome, strict=True))}

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> dict[str, Any]:
        modules = []
        for name, kind, units, params in zip(self.names, self.kinds, self.order, self.module_params, strict=True):
            entry = {"name": name, "kind": kind, "unit_kind": units[0].kind, "unit_params": units[0].params,
                     "params": params, "members": [list(u.members) for u in units],
                     "score": [u.score for u in units], "norm": [u.norm for u in units]}
            if any(u.kv for u in units):
                entry["kv"] = [list(u.kv) for u in units]
            modules.append(entry)
        return {"levels": self.levels, "step_units": self.step_units, "total": self.total, "meta": self.meta,
                "modules": modules}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LevelDatabase:
        order = []
        for m in raw["modules"]:
            kv = m.get("kv") or [[] for _ in m["members"]]
            order.append([Unit(m["name"], m["unit_kind"], tuple(mem), tuple(k), m["unit_params"], s, n)
                          for mem, k, s, n in zip(m["members"], kv, m["score"], m["norm"], strict=True)])
        return cls([m["name"] for m in raw["modules"]], [m["kind"] for m in raw["modules"]], order,
                   dict(raw["step_units"]), raw["levels"], raw["total"], [m["params"] for m in raw["modules"]],
                   raw.get("meta", {}))

    def disk_report(self, stored_bytes: int, bytes_per_param: int) -> dict[str, Any]:
        """This database on disk against a full-size weight copy of every module at every level."""
        space = self.space
        full = sum((g.max_level + 1) * p * bytes_per_param for g, p in zip(space.genes, self.module_params,
                                                                           strict=True))
        return {"stored_bytes": stored_bytes, "full_copies_bytes": full, "ratio": full / max(stored_bytes, 1)}


def build_database(pruner, units: list[Unit], levels: int = DEFAULT_LEVELS,
                   meta: dict[str, Any] | None = None) -> LevelDatabase:
    """Order every module's scored `units` (from `StructuredPruner.score`) and fix the level steps."""
    if levels < 1:
        raise MetricGPError(f"--levels must be at least 1, got {levels}")
    ordered = by_module(units, least_important_first=True)
    names = [m.name for m in pruner.modules]
    kinds = [m.kind for m in pruner.modules]
    order = [ordered[n] for n in names]
    step_units: dict[str, int] = {}
    for kind in dict.fromkeys(kinds):
        mine = [o for o, k in zip(order, kinds, strict=True) if k == kind]
        counts = {len(o) for o in mine}
        sizes = {u.params for o in mine for u in o}
        if len(counts) != 1 or len(sizes) != 1:
            raise MetricGPError(f"the level database needs equal {kind} modules (units {sorted(counts)}, unit "
                                f"sizes {sorted(sizes)}): the model was already pruned unevenly")
        if counts.pop() < 2:
            raise MetricGPError(f"{kind} modules have a single removable unit: nothing to search")
        step_units[kind] = max(1, len(mine[0]) // levels)
    params = []
    for m in pruner.modules:
        lins = {s.linear for s in m.slices + m.kv_slices}
        params.append(sum(p.numel() for n in lins for p in pruner.linears[n].parameters()))
    return LevelDatabase(names, kinds, order, step_units, levels, pruner.dense_decoder_params, params, meta or {})
