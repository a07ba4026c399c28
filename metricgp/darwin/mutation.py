"""Level-switch mutation (EvoPress, DarwinLM): size-preserving by construction.

One switch moves one gene up a level and another gene of the same kind down a level, both within
[0, max level]; an offspring gets min(U{1..3}, U{1..3}) switches. Duplicates (of the parent or of
a sibling) are rejected and drawn again. A `Bias` (the metric prior) may weight which genes move;
without one every eligible gene is equally likely.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from metricgp.darwin.levels import Genome, LevelSpace

MAX_SWITCHES = 3
MAX_TRIES = 50  # draws per offspring before a generation accepts fewer offspring


class Bias(Protocol):
    """Relative weights of the eligible genes (indices) for going up / down one level."""

    def up(self, genome: Sequence[int], genes: Sequence[int]) -> list[float]: ...
    def down(self, genome: Sequence[int], genes: Sequence[int]) -> list[float]: ...


def n_switches(rng: random.Random) -> int:
    return min(rng.randint(1, MAX_SWITCHES), rng.randint(1, MAX_SWITCHES))


def _pick(rng: random.Random, genes: list[int], weights: list[float] | None) -> int:
    if weights is None or sum(weights) <= 0:
        return rng.choice(genes)
    return rng.choices(genes, weights=weights, k=1)[0]


def switch(genome: list[int], space: LevelSpace, rng: random.Random, bias: Bias | None = None) -> bool:
    """One level switch in place; False when no gene can move (every kind stuck)."""
    kinds = space.kinds()
    of_kind = {i: idx for idx in kinds.values() for i in idx}
    up = [i for i, g in enumerate(space.genes)
          if genome[i] < g.max_level and any(genome[j] > 0 for j in of_kind[i] if j != i)]
    if not up:
        return False
    i = _pick(rng, up, bias.up(genome, up) if bias else None)
    down = [j for j in of_kind[i] if j != i and genome[j] > 0]
    j = _pick(rng, down, bias.down(genome, down) if bias else None)
    genome[i] += 1
    genome[j] -= 1
    return True


def mutate(parent: Sequence[int], space: LevelSpace, rng: random.Random, bias: Bias | None = None) -> Genome:
    child = list(parent)
    for _ in range(n_switches(rng)):
        switch(child, space, rng, bias)
    return tuple(child)


def offspring(parent: Genome, n: int, space: LevelSpace, rng: random.Random,
              bias: Bias | None = None) -> tuple[list[Genome], int]:
    """Up to `n` distinct children, none equal to the parent; also the number of duplicates rejected."""
    seen = {tuple(parent)}
    children: list[Genome] = []
    rejected = 0
    for _ in range(n * MAX_TRIES):
        if len(children) == n:
            break
        child = mutate(parent, space, rng, bias)
        if child in seen:
            rejected += 1
            continue
        seen.add(child)
        children.append(child)
    return children, rejected
