"""The level space: one integer level per gene (module or linear), and start genomes of an exact size.

Every gene of one `kind` removes the same number of parameters per level (`step`), so moving one
gene up a level and another of the same kind down a level keeps the total exactly. A genome is a
tuple of levels, in the order of `LevelSpace.genes`.

`start_genome` turns a budget (parameters to remove) into levels: first the number of levels of
each kind (`split_levels`, as close to the desired share of each kind as the steps allow), then
those levels spread over the kind's genes in proportion to per-gene weights (`spread`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from metricgp.errors import MetricGPError

Genome = tuple[int, ...]


@dataclass(frozen=True)
class Gene:
    name: str  # a module (structured) or a linear layer (unstructured)
    kind: str  # genes of one kind trade levels with each other
    max_level: int
    step: int  # parameters removed per level; equal for every gene of a kind
    full: int  # parameters the gene could remove at most (its units x their size): the uniform share


@dataclass(frozen=True)
class LevelSpace:
    genes: tuple[Gene, ...]
    total: int  # what fractions refer to (decoder parameters, prunable weights)

    def __post_init__(self) -> None:
        for kind, idx in self.kinds().items():
            steps = {self.genes[i].step for i in idx}
            if len(steps) != 1:
                raise MetricGPError(f"genes of kind '{kind}' have different level steps {sorted(steps)}: "
                                    "a level switch between them would change the size")

    def kinds(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, g in enumerate(self.genes):
            out.setdefault(g.kind, []).append(i)
        return out

    def step(self, kind: str) -> int:
        return self.genes[self.kinds()[kind][0]].step

    def removed(self, genome: Sequence[int]) -> int:
        return sum(level * g.step for level, g in zip(genome, self.genes, strict=True))

    def kept_fraction(self, genome: Sequence[int]) -> float:
        return 1.0 - self.removed(genome) / self.total

    def check(self, genome: Sequence[int]) -> Genome:
        if len(genome) != len(self.genes):
            raise MetricGPError(f"genome has {len(genome)} levels, the space {len(self.genes)} genes")
        for level, g in zip(genome, self.genes, strict=True):
            if not 0 <= level <= g.max_level:
                raise MetricGPError(f"level {level} of {g.name} is outside [0, {g.max_level}]")
        return tuple(int(v) for v in genome)

    def capacity(self) -> int:
        return sum(g.max_level * g.step for g in self.genes)


def split_levels(space: LevelSpace, budget: int, desired: Mapping[str, float], what: str = "target") -> dict[str, int]:
    """Levels per kind whose removed parameters are nearest `budget`, each kind near its `desired`
    parameter count. Raises MetricGPError when no combination lands within half the finest step."""
    kinds = space.kinds()
    caps = {k: sum(space.genes[i].max_level for i in idx) for k, idx in kinds.items()}
    steps = {k: space.step(k) for k in kinds}
    finest = min(steps.values())
    if budget < 0 or budget > space.capacity() + finest / 2:
        low = 1 - space.capacity() / space.total
        raise MetricGPError(f"{what} is unreachable: the level database spans kept fractions "
                            f"[{low:.4f}, 1] (every module at its top level .. none pruned)")
    levels = {k: min(caps[k], int(max(desired.get(k, 0.0), 0.0) // steps[k])) for k in kinds}
    rest = budget - sum(levels[k] * steps[k] for k in kinds)
    for k in sorted(kinds, key=lambda k: (-steps[k], k)):  # coarse kinds first, the finest last
        add = min(caps[k] - levels[k], max(rest, 0) // steps[k])
        levels[k] += add
        rest -= add * steps[k]
    rest = _improve(levels, rest, steps, caps)
    if abs(rest) * 2 > finest:
        raise MetricGPError(f"{what} is unreachable with the database's steps: the levels found miss it by "
                            f"{abs(rest)} parameters ({abs(rest) / space.total:.4f} of the total)")
    return levels


def _improve(levels: dict[str, int], rest: int, steps: dict[str, int], caps: dict[str, int]) -> int:
    """Best-improvement moves while they bring the removed parameters closer to the budget: one kind
    moves by 1 or 2 levels, then up to two other kinds by the counts that best absorb the remainder.
    Returns the remainder."""

    def absorb(r: int, k: str) -> list[int]:  # the two level changes of kind k nearest to r / step
        lo, hi = -levels[k], caps[k] - levels[k]
        return sorted({max(lo, min(hi, r // steps[k])), max(lo, min(hi, -(-r // steps[k])))})

    while rest:
        best: tuple[int, dict[str, int]] = (abs(rest), {})
        for a in levels:
            for da in (1, -1, 2, -2):
                if not 0 <= levels[a] + da <= caps[a]:
                    continue
                r1 = rest - da * steps[a]
                moves = [(r1, {a: da})]
                for b in (b for b in levels if b != a):
                    for db in absorb(r1, b):
                        r2 = r1 - db * steps[b]
                        moves.append((r2, {a: da, b: db}))
                        moves += [(r2 - dc * steps[c], {a: da, b: db, c: dc})
                                  for c in levels if c not in (a, b) for dc in absorb(r2, c)]
                for r, move in moves:
                    if abs(r) < best[0]:
                        best = (abs(r), move)
        if not best[1]:
            break
        for k, d in best[1].items():
            levels[k] += d
            rest -= d * steps[k]
    return rest


def spread(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """`total` levels over genes in proportion to `weights`, never above `caps` (water-filling:
    a gene whose share reaches its cap is filled and the rest shared again; the last remainders go
    to the largest fractional shares, ties to the first gene)."""
    if total > sum(caps):
        raise MetricGPError(f"cannot place {total} levels in genes holding {sum(caps)}")
    out = [0] * len(caps)
    left = total
    active = [i for i in range(len(caps)) if caps[i] > 0]
    while left > 0:
        w = [max(float(weights[i]), 0.0) for i in active]
        w = w if sum(w) > 0 else [1.0] * len(active)
        share = {i: left * wi / sum(w) for i, wi in zip(active, w, strict=True)}
        full = [i for i in active if out[i] + share[i] >= caps[i]]
        if full:
            for i in full:
                left -= caps[i] - out[i]
                out[i] = caps[i]
            active = [i for i in active if i not in full]
            continue
        for i in active:
            out[i] += math.floor(share[i])
        extra = left - sum(math.floor(share[i]) for i in active)
        for i in sorted(active, key=lambda i: (-(share[i] - math.floor(share[i])), i))[:extra]:
            out[i] += 1
        left = 0
    return out


def start_genome(space: LevelSpace, budget: int, gene_weights: Sequence[float] | None = None,
                 kind_desired: Mapping[str, float] | None = None, what: str = "target") -> Genome:
    """A genome removing `budget` parameters (to half the finest step).

    Default: the uniform start (DarwinLM: every gene at the target level), i.e. every kind removes
    the same fraction of what it could remove, and every gene of a kind gets the same level (the
    first genes take the remainder). `kind_desired` (parameters per kind) and `gene_weights`
    replace either with a prior."""
    kinds = space.kinds()
    if kind_desired is None:
        full = {k: sum(space.genes[i].full or space.genes[i].max_level * space.genes[i].step for i in idx)
                for k, idx in kinds.items()}
        kind_desired = {k: budget * full[k] / sum(full.values()) for k in kinds}
    per_kind = split_levels(space, budget, kind_desired, what)
    genome = [0] * len(space.genes)
    for k, idx in kinds.items():
        weights = [1.0] * len(idx) if gene_weights is None else [gene_weights[i] for i in idx]
        for i, level in zip(idx, spread(per_kind[k], weights, [space.genes[i].max_level for i in idx]), strict=True):
            genome[i] = level
    return space.check(genome)


class JsonDatabase:
    """save/load for a level database that has `to_dict` and `from_dict` (structured and unstructured)."""

    def save(self, path: Path) -> int:
        """Write compact JSON; returns its size in bytes."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        Path(path).write_text(text, encoding="utf-8")
        return len(text.encode())

    @classmethod
    def load(cls, path: Path):
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise MetricGPError(f"cannot read the level database {path}: {err}") from None
