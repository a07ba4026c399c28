"""The GP strategy's pluggable parts as registries (dicts from name to a plain function, like
`PRUNE_MODES`): mutations and replacement algorithms. A search space names them (`gp.mutations`,
`gp.algorithm`), `space.py` validates the names against these keys, `gp.py` calls them; one entry
adds a choice everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from deap import gp

from metricgp.expr.invariance import is_scale_free

Individual = Any  # metricgp.search.trees.Individual (not imported: trees.py imports space.py, which imports this)


def rank_key(ind: Individual) -> tuple[float, float, bool, int]:
    """Sort key, best first: higher stage, lower fitness, then (on a tie, which is common: two
    forms that prune the same weights score exactly alike) a scale-free metric before one that
    depends on the statistics' scale (`metricgp.expr.invariance`), then the smaller tree."""
    stage, value = ind.fitness.values
    scale_free = ind.node is not None and is_scale_free(ind.node)
    return (-stage, value, not scale_free, len(ind))


# ----------------------------------------------------------------------------------- mutations
# name -> fn(primitive set) -> a DEAP mutation: individual -> (individual,)


def _uniform(pset: gp.PrimitiveSet) -> Callable:
    expr = functools.partial(gp.genFull, pset=pset, min_=0, max_=2)
    return functools.partial(gp.mutUniform, expr=expr, pset=pset)


def _node_replacement(pset: gp.PrimitiveSet) -> Callable:
    return functools.partial(gp.mutNodeReplacement, pset=pset)


def _shrink(pset: gp.PrimitiveSet) -> Callable:
    return gp.mutShrink


def _ephemeral(pset: gp.PrimitiveSet) -> Callable:
    return functools.partial(gp.mutEphemeral, mode="one")


MUTATIONS: dict[str, Callable[[gp.PrimitiveSet], Callable]] = {
    "uniform": _uniform,  # a random subtree (depth <= 2) replaces a random subtree
    "node_replacement": _node_replacement,  # one node becomes another of the same arity
    "shrink": _shrink,  # a subtree is replaced by one of its own subtrees
    "ephemeral": _ephemeral,  # one constant is redrawn (spaces with constants only)
}


# ---------------------------------------------------------------------- replacement algorithms
# name -> fn(population, evaluated children, population size) -> (next population, children
# rejected as duplicates). A child equivalent (same canonical key) to a member never joins twice.


def steady_state(population: Sequence[Individual], children: Sequence[Individual],
                 size: int) -> tuple[list[Individual], int]:
    """Each child in turn joins the population and the worst member leaves (the paper's loop)."""
    pop = list(population)
    keys = [ind.key for ind in pop]
    rejected = 0
    for child in children:
        if child.key in keys:
            rejected += 1
            continue
        pop.append(child)
        keys.append(child.key)
        worst = max(range(len(pop)), key=lambda i: rank_key(pop[i]))
        del pop[worst]
        del keys[worst]
    return pop, rejected


def mu_plus_lambda(population: Sequence[Individual], children: Sequence[Individual],
                   size: int) -> tuple[list[Individual], int]:
    """The best `size` distinct forms of parents + children survive (duplicates only fill up)."""
    pool = sorted([*population, *children], key=rank_key)
    keep: list[Individual] = []
    rest: list[Individual] = []
    seen: set[str] = set()
    for ind in pool:
        (rest if ind.key in seen else keep).append(ind)
        seen.add(ind.key)
    rejected = sum(1 for c in children if any(c is r for r in rest))
    return (keep + rest)[:size], rejected


ALGORITHMS: dict[str, Callable[[Sequence[Individual], Sequence[Individual], int], tuple[list[Individual], int]]] = {
    "steady_state": steady_state,
    "mu_plus_lambda": mu_plus_lambda,
}
