"""Opposing-operation simplification (OOS) of a DEAP individual, and its canonical key.

Every child goes through `apply_oos`: the tree is simplified with `metricgp.expr.simplify`
(rank-only: root transforms that cannot change a ranking are stripped too), converted back into a
DEAP tree, and labelled with its canonical key. The search uses the key to regenerate a child
equivalent to a parent and to answer an already-evaluated equivalent from the fitness cache.
"""

from __future__ import annotations

from metricgp.expr.simplify import canonical_key, simplify
from metricgp.search.trees import Grammar, Individual, node_to_tree, tree_to_node


def apply_oos(ind: Individual, grammar: Grammar) -> tuple[Individual, int]:
    """(simplified individual with `.node` and `.key` set and no fitness, nodes removed)."""
    node = tree_to_node(ind)
    simple = simplify(node, rank_only=True)
    out = node_to_tree(simple, grammar)
    out.key = canonical_key(simple)
    return out, node.size() - simple.size()
