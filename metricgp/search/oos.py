"""Opposing-operation simplification (OOS) of a DEAP individual, and its canonical key.

Every child goes through `apply_oos`: the tree is simplified with `metricgp.expr.simplify`
in the search's scope (root transforms that cannot change the ranking the evaluator's masks see
are stripped too: "tensor" for unstructured and N:M masks, "global" for structure scores ranked
across layers), converted back into a DEAP tree, and labelled with its canonical key in the same
scope. The search uses the key to regenerate a child equivalent to a parent and to answer an
already-evaluated equivalent from the fitness cache.
"""

from __future__ import annotations

from metricgp.expr.simplify import DEFAULT_SCOPE, canonical_key, simplify
from metricgp.search.trees import Grammar, Individual, node_to_tree, tree_to_node


def apply_oos(ind: Individual, grammar: Grammar, scope: str = DEFAULT_SCOPE) -> tuple[Individual, int]:
    """(simplified individual with `.node` and `.key` set and no fitness, nodes removed)."""
    node = tree_to_node(ind)
    simple = simplify(node, scope)
    out = node_to_tree(simple, grammar)
    out.key = canonical_key(simple, scope)
    return out, node.size() - simple.size()
