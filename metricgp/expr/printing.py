"""Printers for a metric tree: functional, infix (minimal parentheses), LaTeX, sympy, describe().

`to_functional` and `to_infix` both round-trip through `parse` to an equal `Node`.
"""

from __future__ import annotations

from fractions import Fraction

import sympy

from metricgp.expr.ops import FOLLOWS, LEAVES, NONNEGATIVE, OPERATORS, PRECEDENCE_ATOM, PRECEDENCE_PREFIX, Operator
from metricgp.expr.tree import Node, const_text
from metricgp.expr.tree import to_functional as to_functional  # the functional printer lives with the tree


def is_nonnegative(node: Node) -> bool:
    """True if the node's value is >= 0 for every finite input (conservative)."""
    if node.is_const:
        return (node.value or 0.0) >= 0
    if node.is_leaf:
        return LEAVES[node.op].nonnegative
    sign = OPERATORS[node.op].sign
    if sign == NONNEGATIVE:
        return True
    return sign == FOLLOWS and all(is_nonnegative(c) for c in node.children)


def _prec(node: Node) -> int:
    """How tightly the printed node binds: an operator's `precedence`; a negative constant prints
    with a leading '-', like a prefix operator; leaves and other constants are atoms."""
    if node.is_const:
        return PRECEDENCE_PREFIX if node.value is not None and node.value < 0 else PRECEDENCE_ATOM
    if node.is_leaf:
        return PRECEDENCE_ATOM
    return OPERATORS[node.op].precedence


def to_infix(node: Node) -> str:
    """Infix with the fewest parentheses that still parse back to exactly this tree."""
    if node.is_const:
        return const_text(node.value)
    if node.is_leaf:
        return node.op
    op = OPERATORS[node.op]
    if op.symbol and op.arity == 2:
        left, right = node.children
        ltxt, rtxt = to_infix(left), to_infix(right)
        if _prec(left) < op.precedence:
            ltxt = f"({ltxt})"
        # Infix operators parse left-associatively, so an equal-precedence right child needs parens.
        if _prec(right) <= op.precedence:
            rtxt = f"({rtxt})"
        return f"{ltxt} {op.symbol} {rtxt}"
    if op.symbol:
        (child,) = node.children
        # `-2.5` would parse as the constant -2.5, so a prefix operator of a constant keeps its parentheses.
        if _prec(child) >= PRECEDENCE_ATOM and not child.is_const:
            return f"{op.symbol}{to_infix(child)}"
        return f"{op.symbol}({to_infix(child)})"
    return f"{node.op}({', '.join(to_infix(c) for c in node.children)})"


def to_latex(node: Node) -> str:
    if node.is_const:
        return f"{node.value:g}"
    if node.is_leaf:
        return LEAVES[node.op].latex or node.op
    op = OPERATORS[node.op]
    parts = [to_latex(c) for c in node.children]
    if op.symbol and op.arity == 2 and not op.latex_grouped:
        for k, child in enumerate(node.children):
            if _prec(child) < op.precedence + k or (_prec(child) == PRECEDENCE_PREFIX and k == 1):
                parts[k] = rf"\left({parts[k]}\right)"
    return op.latex.format(*parts)


# ---------------------------------------------------------------------------------------- sympy

def leaf_symbol(name: str) -> sympy.Symbol:
    """The sympy symbol of a leaf, read from `LEAVES` when asked (so a leaf added there is known);
    sympy caches symbols by name and assumptions, so this returns the same object every time."""
    lf = LEAVES[name]
    return sympy.Symbol(name, nonnegative=True) if lf.nonnegative else sympy.Symbol(name, real=True)


_OPAQUE: dict[tuple[str, bool], type[sympy.Function]] = {}


def opaque_function(op: Operator) -> type[sympy.Function]:
    """The sympy function standing for an operator without a closed elementwise form (whole-tensor
    operators such as mms). Telling sympy it is real (nonnegative for NONNEGATIVE operators) is
    true and keeps its assumption queries cheap."""
    nonneg = op.sign == NONNEGATIVE
    fn = _OPAQUE.get((op.name, nonneg))
    if fn is None:
        fn = sympy.Function(op.name, nonnegative=True) if nonneg else sympy.Function(op.name, real=True)
        _OPAQUE[(op.name, nonneg)] = fn
    return fn


def _sympy_const(value: float) -> sympy.Expr:
    # Short decimals become exact rationals, so 2.0*W equals W + W and 0.5*W + 0.5*W equals W.
    # Long ones (folded float32 results) stay Floats: a huge rational under sqrt makes sympy factor.
    text = repr(float(value))
    if len(text) > 12:
        return sympy.Float(text)
    frac = Fraction(text)
    return sympy.Rational(frac.numerator, frac.denominator)


def to_sympy(node: Node) -> sympy.Expr:
    if node.is_const:
        return _sympy_const(node.value if node.value is not None else 0.0)
    if node.is_leaf:
        return leaf_symbol(node.op)
    args = [to_sympy(c) for c in node.children]
    op = OPERATORS[node.op]
    if op.sympy_fn is None:
        return opaque_function(op)(*args)
    if op.sympy_fn_nonneg is not None:
        if all(is_nonnegative(c) for c in node.children):
            return op.sympy_fn_nonneg(*args)
    return op.sympy_fn(*args)
