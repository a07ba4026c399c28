"""Random metric trees for property tests, benchmarks and the search's initial population."""

from __future__ import annotations

import random
from collections.abc import Sequence

from metricgp.expr.ops import OPERATORS
from metricgp.expr.tree import Node, call, const, leaf


def random_tree(
    rng: random.Random,
    max_depth: int,
    ops: Sequence[str] | None = None,
    leaves: Sequence[str] = ("W", "X", "G"),
    const_prob: float = 0.0,
) -> Node:
    """A 'grow' tree of depth <= max_depth: below the root, each node is a terminal with
    probability len(leaves) / (len(leaves) + len(ops)), and always at the last level.
    Terminals are a constant (uniform in [-5, 5], 2 decimals, never 0) with `const_prob`,
    else a random leaf."""
    names = list(ops) if ops is not None else list(OPERATORS)
    if max_depth < 1 or not leaves:
        raise ValueError("random_tree needs max_depth >= 1 and at least one leaf")
    p_term = len(leaves) / (len(leaves) + len(names)) if names else 1.0

    def grow(depth: int) -> Node:
        last = depth >= max_depth
        if last or (depth > 1 and rng.random() < p_term):
            if rng.random() < const_prob:
                value = round(rng.uniform(-5.0, 5.0), 2)
                return const(value if value != 0.0 else 1.0)
            return leaf(rng.choice(list(leaves)))
        name = rng.choice(names)
        return call(name, *(grow(depth + 1) for _ in range(OPERATORS[name].arity)))

    return grow(1)
