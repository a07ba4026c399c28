"""DEAP side of the search: the primitive set built from a `SearchSpace`, the individual and fitness
types, and conversion between DEAP's `PrimitiveTree` and our `Node`.

The DEAP classes are defined here, once, as ordinary subclasses (no `creator.create`, so nothing is
written into module globals and nothing can be created twice). DEAP's primitive functions are
stored but never called: trees are only ever evaluated through `Node` and the evaluator.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from deap import base, gp

from metricgp.expr.ops import LEAVES, OPERATORS
from metricgp.expr.tree import Node, call, const, leaf
from metricgp.search.space import Constants, SearchSpace

ERC_NAME = "ERC"


class MetricFitness(base.Fitness):
    """(stage reached, fitness at that stage): higher stage first, then lower fitness.

    DEAP compares fitnesses lexicographically on `wvalues`, so a candidate promoted to a higher
    fidelity beats every candidate that stopped below it; a degenerate one has stage -1.
    """

    weights = (1.0, -1.0)


class Individual(gp.PrimitiveTree):
    """A PrimitiveTree with its fitness, its `Node` form and its canonical key (set by OOS)."""

    def __init__(self, content) -> None:
        super().__init__(content)
        self.fitness = MetricFitness()
        self.node: Node | None = None
        self.key: str | None = None


def _draw_constant(low: float, high: float, decimals: int, values: tuple[float, ...]) -> float:
    # Uses the global `random`, like every DEAP operator, so the run's one seed drives it.
    if values:
        return random.choice(values)
    for _ in range(100):
        v = round(random.uniform(low, high), decimals)
        if v != 0.0:
            return v
    return high


@dataclass
class Grammar:
    """The primitive set of a space, plus what tree conversion needs."""

    pset: gp.PrimitiveSet
    erc: type | None  # the ephemeral-constant class, when constants are enabled

    def constant(self, value: float) -> gp.Terminal:
        """A constant terminal; an ERC instance when the space has constants (so mutEphemeral
        can redraw it), else a plain terminal outside the set (OOS may fold to constants)."""
        if self.erc is not None:
            term = self.erc.__new__(self.erc)
            term.value = float(value)
            return term
        return gp.Terminal(float(value), False, object)


def build_grammar(space: SearchSpace) -> Grammar:
    """The DEAP primitive set of a search space."""
    pset = gp.PrimitiveSet("metric", 0)
    for name in space.operators:
        op = OPERATORS[name]
        pset.addPrimitive(op.fn, op.arity, name=name)
    for name in space.leaves:
        pset.addTerminal(name, name=name)
    erc = None
    c: Constants = space.constants
    if c.enabled:
        draw = functools.partial(_draw_constant, c.low, c.high, c.decimals, tuple(c.values))
        pset.addEphemeralConstant(ERC_NAME, draw)
        erc = pset.mapping[ERC_NAME]
    return Grammar(pset, erc)


def tree_to_node(tree: gp.PrimitiveTree) -> Node:
    """Prefix list -> Node (built from the right with a stack)."""
    stack: list[Node] = []
    for item in reversed(tree):
        if isinstance(item, gp.Primitive):
            stack.append(call(item.name, *(stack.pop() for _ in range(item.arity))))
        elif isinstance(item.value, str):
            if item.value not in LEAVES:
                raise ValueError(f"unknown terminal {item.value!r}")
            stack.append(leaf(item.value))
        else:
            stack.append(const(float(item.value)))
    if len(stack) != 1:
        raise ValueError("malformed prefix tree")
    return stack[0]


def node_to_tree(node: Node, grammar: Grammar) -> Individual:
    """Node -> Individual. Operators or leaves outside the space (OOS may introduce `abs` or `sub`)
    become primitives outside the set: valid genes, just never drawn by mutation."""
    mapping = grammar.pset.mapping
    items = []
    for n in node.walk():
        if n.is_const:
            items.append(grammar.constant(n.value or 0.0))
        elif n.is_leaf:
            term = mapping.get(n.op)
            items.append(term if isinstance(term, gp.Terminal) else gp.Terminal(n.op, True, object))
        else:
            prim = mapping.get(n.op)
            if not isinstance(prim, gp.Primitive):
                prim = gp.Primitive(n.op, [object] * OPERATORS[n.op].arity, object)
            items.append(prim)
    ind = Individual(items)
    ind.node = node
    return ind
