"""Printers for a metric tree: functional, infix (minimal parentheses), LaTeX, sympy, describe().

`to_functional` and `to_infix` both round-trip through `parse` to an equal `Node`.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import sympy

from metricgp.expr.ops import LEAVES, LOG_EPS, OPERATORS
from metricgp.expr.tree import Node

# Binding strength for infix printing; atoms and calls bind tightest.
_PREC = {"add": 1, "sub": 1, "mul": 2, "div": 2, "neg": 3}
_ATOM = 4


def _const_text(value: float | None) -> str:
    # repr(float) is Python's shortest round-trip form (2.0, 0.001, 1e-05).
    return repr(float(value if value is not None else 0.0))


def to_functional(node: Node) -> str:
    if node.is_const:
        return _const_text(node.value)
    if node.is_leaf:
        return node.op
    return f"{node.op}({', '.join(to_functional(c) for c in node.children)})"


def _prec(node: Node) -> int:
    if node.is_const and node.value is not None and node.value < 0:
        return _PREC["neg"]  # prints with a leading '-', like neg
    return _PREC.get(node.op, _ATOM)


def to_infix(node: Node) -> str:
    """Infix with the fewest parentheses that still parse back to exactly this tree."""
    if node.is_const:
        return _const_text(node.value)
    if node.is_leaf:
        return node.op
    op = OPERATORS[node.op]
    if op.symbol:
        left, right = node.children
        p = _PREC[node.op]
        ltxt, rtxt = to_infix(left), to_infix(right)
        if _prec(left) < p:
            ltxt = f"({ltxt})"
        # All four are parsed left-associatively, so an equal-precedence right child needs parens.
        if _prec(right) <= p:
            rtxt = f"({rtxt})"
        return f"{ltxt} {op.symbol} {rtxt}"
    if node.op == "neg":
        (child,) = node.children
        # `-2.5` would parse as the constant -2.5, so neg of a constant keeps its parentheses.
        if _prec(child) >= _ATOM and not child.is_const:
            return f"-{to_infix(child)}"
        return f"-({to_infix(child)})"
    return f"{node.op}({', '.join(to_infix(c) for c in node.children)})"


def to_latex(node: Node) -> str:
    if node.is_const:
        return f"{node.value:g}"
    if node.is_leaf:
        return node.op
    op = OPERATORS[node.op]
    parts = [to_latex(c) for c in node.children]
    if op.symbol in ("+", "-", "*"):
        p = _PREC[node.op]
        for k, child in enumerate(node.children):
            if _prec(child) < p + k or (_prec(child) == _PREC["neg"] and k == 1):
                parts[k] = rf"\left({parts[k]}\right)"
    return op.latex.format(*parts)


# ---------------------------------------------------------------------------------------- sympy

_SYMBOLS = {
    name: sympy.Symbol(name, real=True) if not lf.nonnegative else sympy.Symbol(name, nonnegative=True)
    for name, lf in LEAVES.items()
}
# Whole-tensor operators have no closed elementwise form: they stay opaque functions. Telling sympy
# they are real (mms: in [0, 1]) is true and keeps its assumption queries cheap.
_OPAQUE = {
    name: sympy.Function(name, nonnegative=True) if name == "mms" else sympy.Function(name, real=True)
    for name, o in OPERATORS.items()
    if not o.elementwise
}


def _sympy_const(value: float) -> sympy.Expr:
    # Short decimals become exact rationals, so 2.0*W equals W + W and 0.5*W + 0.5*W equals W.
    # Long ones (folded float32 results) stay Floats: a huge rational under sqrt makes sympy factor.
    text = repr(float(value))
    if len(text) > 12:
        return sympy.Float(text)
    frac = Fraction(text)
    return sympy.Rational(frac.numerator, frac.denominator)


_ELEMENTWISE = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,  # protected only where |b| < PROTECT_EPS
    "neg": lambda a: -a,
    "sqr": lambda a: a**2,
    "abs": sympy.Abs,
    "exp": sympy.exp,  # clamped only beyond e^80
    "tanh": sympy.tanh,
    "identity": lambda a: a,
    "sqrt": lambda a: sympy.sqrt(sympy.Abs(a)),
    # The protected log is exactly this, so log(exp(x)) is (rightly) not cancelled by sympy.
    "log": lambda a: sympy.log(sympy.Abs(a) + _sympy_const(LOG_EPS)),
}
# The same, for a child we already know is >= 0: skips sympy's slow sign queries on Abs.
_ELEMENTWISE_NONNEG = {
    "abs": lambda a: a,
    "sqrt": sympy.sqrt,
    "log": lambda a: sympy.log(a + _sympy_const(LOG_EPS)),
}


def to_sympy(node: Node) -> sympy.Expr:
    if node.is_const:
        return _sympy_const(node.value if node.value is not None else 0.0)
    if node.is_leaf:
        return _SYMBOLS[node.op]
    args = [to_sympy(c) for c in node.children]
    if node.op in _OPAQUE:
        return _OPAQUE[node.op](*args)
    if node.op in _ELEMENTWISE_NONNEG:
        from metricgp.expr.simplify import is_nonnegative

        if is_nonnegative(node.children[0]):
            return _ELEMENTWISE_NONNEG[node.op](*args)
    return _ELEMENTWISE[node.op](*args)


_SYMPY_STR: dict[str, str] = {}


def _sympy_str(node: Node) -> str:
    """str of the simplified sympy form (same function, not rank-reduced); cached by formula."""
    from metricgp.expr.simplify import SYMPY_MAX_SIZE, simplify

    key = to_functional(node)
    if key not in _SYMPY_STR:
        tree = simplify(node, rank_only=False)
        text = to_functional(tree)
        if tree.size() <= SYMPY_MAX_SIZE:
            try:
                text = str(to_sympy(tree))
            except (RecursionError, ValueError, TypeError, ArithmeticError):
                pass  # the simplified functional form is still a faithful description
        if len(_SYMPY_STR) > 10_000:
            _SYMPY_STR.clear()
        _SYMPY_STR[key] = text
    return _SYMPY_STR[key]


def describe(node: Node) -> dict[str, Any]:
    """Every printed form of a metric plus its size, depth and leaves (for reports and the CLI)."""
    return {
        "functional": to_functional(node),
        "infix": to_infix(node),
        "latex": to_latex(node),
        "sympy": _sympy_str(node),
        "size": node.size(),
        "depth": node.depth(),
        "leaves": sorted(node.leaves_used()),
    }
