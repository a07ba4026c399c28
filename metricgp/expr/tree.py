"""The metric expression tree: an immutable node of an operator, a leaf or a constant.

Everything else in `metricgp.expr` (parser, printers, compiler, simplifier) and the GP search
works on this one type, so a formula has a single in-memory form whatever produced it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

CONST = "const"


@dataclass(frozen=True)
class Node:
    """One node of a metric expression.

    `op` is an operator name from `metricgp.expr.ops.OPERATORS`, a leaf name from
    `metricgp.expr.ops.LEAVES`, or `CONST` (then `value` holds the number).
    """

    op: str
    children: tuple[Node, ...] = ()
    value: float | None = None

    @property
    def is_const(self) -> bool:
        return self.op == CONST

    @property
    def is_leaf(self) -> bool:
        return not self.children and not self.is_const

    def size(self) -> int:
        return 1 + sum(c.size() for c in self.children)

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children), default=0)

    def walk(self) -> Iterator[Node]:
        """Pre-order traversal (the order DEAP's PrimitiveTree uses)."""
        yield self
        for c in self.children:
            yield from c.walk()

    def leaves_used(self) -> frozenset[str]:
        return frozenset(n.op for n in self.walk() if n.is_leaf)

    def __str__(self) -> str:
        return to_functional(self)


def const_text(value: float | None) -> str:
    # repr(float) is Python's shortest round-trip form (2.0, 0.001, 1e-05).
    return repr(float(value if value is not None else 0.0))


def to_functional(node: Node) -> str:
    """The functional form, `mul(abs(W), sqrt(X))` (str(node); every other printer is in printing.py)."""
    if node.is_const:
        return const_text(node.value)
    if node.is_leaf:
        return node.op
    return f"{node.op}({', '.join(to_functional(c) for c in node.children)})"


def leaf(name: str) -> Node:
    return Node(name)


def const(value: float) -> Node:
    return Node(CONST, (), float(value))


def call(op: str, *children: Node) -> Node:
    return Node(op, tuple(children))
