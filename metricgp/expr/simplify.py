"""Opposing-operation simplification (OOS) and canonical keys for equivalence detection.

Every rule below is exact under the protected semantics of `ops.py` (float32), except where its
doc says otherwise; those few differ only outside float32's normal range or by rounding.
A rewrite is accepted only if it does not make the tree larger.

Deliberately absent:
- log(exp x) -> x: the protected log is log(|x| + 1e-3), so it is not an inverse of exp.
- div(x, x) -> 1 in general: protected div gives x / 1e-8 (0 at x = 0) where |x| < 1e-8, and
  already-pruned layers contain exact zeros, so the rewrite would change which weights are pruned.
  It fires only when x is provably bounded away from zero.
- div(neg x, neg y) -> div(x, y): at y = 0 the guard's sign flips (-0.0 counts as positive).
- exp/tanh/sqrt at the root under rank_only: monotone, but not affine, so they would change
  aggregated (structured) scores and merge distinct ties; only affine root transforms are stripped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch

from metricgp.expr.ops import LEAVES, LOG_EPS, OPERATORS, PROTECT_EPS
from metricgp.expr.printing import _OPAQUE, to_functional, to_sympy
from metricgp.expr.tree import Node, call, const

# Trees larger than this (after simplification) skip sympy in canonical_key: cost grows fast.
SYMPY_MAX_SIZE = 40


@dataclass(frozen=True)
class Rule:
    """A named rewrite: `apply(node)` returns the replacement, or None if it does not match."""

    name: str
    doc: str
    apply: Callable[[Node], Node | None]


def _c(node: Node) -> float | None:
    return node.value if node.is_const else None


def is_nonnegative(node: Node) -> bool:
    """True if the node's value is >= 0 for every finite input (conservative)."""
    if node.is_const:
        return (node.value or 0.0) >= 0
    if node.is_leaf:
        return LEAVES[node.op].nonnegative
    if node.op in ("sqr", "abs", "sqrt", "exp", "mms"):
        return True
    if node.op in ("tanh", "identity", "rownorm", "colnorm"):  # sign-preserving
        return is_nonnegative(node.children[0])
    if node.op in ("add", "mul", "div"):  # div: a >= 0 denominator is floored at +PROTECT_EPS
        return all(is_nonnegative(c) for c in node.children)
    return False


def _away_from_zero(node: Node) -> bool:
    """True if |value| >= PROTECT_EPS everywhere, so protected div(x, x) is exactly 1."""
    if node.is_const:
        return abs(node.value or 0.0) >= PROTECT_EPS
    if node.op in ("abs", "neg", "identity"):
        return _away_from_zero(node.children[0])
    if node.op == "add":
        a, b = node.children
        return any(_c(k) is not None and _c(k) >= PROTECT_EPS and is_nonnegative(o)
                   for k, o in ((a, b), (b, a)))
    return False


def _unary(op: str, inner: str | tuple[str, ...] | None = None):
    """Match op(child) (optionally with child.op in `inner`); return the child or None."""
    inner = (inner,) if isinstance(inner, str) else inner

    def match(node: Node) -> Node | None:
        if node.op != op:
            return None
        (child,) = node.children
        if inner is not None and child.op not in inner:
            return None
        return child

    return match


def _rule(name: str, doc: str):
    def deco(fn: Callable[[Node], Node | None]) -> Rule:
        return Rule(name, doc, fn)

    return deco


@_rule("neg_neg", "neg(neg x) -> x (exact)")
def _neg_neg(n):
    c = _unary("neg", "neg")(n)
    return c.children[0] if c else None


@_rule("abs_neg", "abs(neg x) -> abs x (exact)")
def _abs_neg(n):
    c = _unary("abs", "neg")(n)
    return call("abs", c.children[0]) if c else None


@_rule("abs_nonneg", "abs(x) -> x for provably nonnegative x: abs(abs x), abs(sqr x), abs(sqrt x), "
       "abs(X), abs(G), abs(mul(X, G)), ... (exact)")
def _abs_nonneg(n):
    c = _unary("abs")(n)
    return c if c is not None and is_nonnegative(c) else None


@_rule("even_neg", "sqr(neg x) -> sqr x, sqrt(neg x) -> sqrt x (sqrt is sqrt|x|) (exact)")
def _even_neg(n):
    if n.op in ("sqr", "sqrt") and n.children[0].op == "neg":
        return call(n.op, n.children[0].children[0])
    return None


@_rule("sqrt_sqr", "sqrt(sqr x) -> abs x (exact unless x^2 over/underflows float32: "
       "|x| > 1.8e19 or < 1e-19)")
def _sqrt_sqr(n):
    c = _unary("sqrt", "sqr")(n)
    return call("abs", c.children[0]) if c else None


@_rule("sqr_sqrt", "sqr(sqrt x) -> abs x (exact up to one rounding)")
def _sqr_sqrt(n):
    c = _unary("sqr", "sqrt")(n)
    return call("abs", c.children[0]) if c else None


@_rule("exp_log", f"exp(log x) -> add(abs x, {LOG_EPS}) (exact up to rounding for |x| < e^80; "
       "applied only where abs x vanishes, so the tree does not grow)")
def _exp_log(n):
    c = _unary("exp", "log")(n)
    return call("add", call("abs", c.children[0]), const(LOG_EPS)) if c else None


@_rule("identity", "identity(x) -> x (exact)")
def _identity(n):
    return _unary("identity")(n)


@_rule("sub_self", "sub(x, x) -> 0 (exact: x is always finite)")
def _sub_self(n):
    return const(0.0) if n.op == "sub" and n.children[0] == n.children[1] else None


@_rule("div_self", "div(x, x) -> 1 only where |x| >= PROTECT_EPS is provable (see module doc)")
def _div_self(n):
    if n.op == "div" and n.children[0] == n.children[1] and _away_from_zero(n.children[0]):
        return const(1.0)
    return None


@_rule("mul_zero", "mul(0, x) -> 0 (exact: x is always finite)")
def _mul_zero(n):
    if n.op == "mul" and any(_c(k) == 0.0 for k in n.children):
        return const(0.0)
    return None


@_rule("add_neg", "add(x, neg y) -> sub(x, y); add(neg y, x) -> sub(x, y) (exact)")
def _add_neg(n):
    if n.op != "add":
        return None
    a, b = n.children
    if b.op == "neg":
        return call("sub", a, b.children[0])
    if a.op == "neg":
        return call("sub", b, a.children[0])
    return None


@_rule("sub_neg", "sub(x, neg y) -> add(x, y) (exact)")
def _sub_neg(n):
    if n.op == "sub" and n.children[1].op == "neg":
        return call("add", n.children[0], n.children[1].children[0])
    return None


@_rule("mul_neg_neg", "mul(neg x, neg y) -> mul(x, y) (exact)")
def _mul_neg_neg(n):
    if n.op == "mul" and all(k.op == "neg" for k in n.children):
        return call("mul", *(k.children[0] for k in n.children))
    return None


@_rule("normalise_twice", "mms(mms x), mms(zsn x) -> mms x; zsn(zsn x), zsn(mms x) -> zsn x "
       "(both are invariant under increasing affine maps; exact up to rounding)")
def _normalise_twice(n):
    c = _unary(n.op, ("mms", "zsn"))(n) if n.op in ("mms", "zsn") else None
    return call(n.op, c.children[0]) if c else None


@_rule("fold", "an elementwise operator of constants -> the constant its protected float32 fn gives; "
       "mms/zsn of a constant -> 0 (exact: the compiler evaluates constants the same way)")
def _fold(n):
    if not n.children or not all(k.is_const for k in n.children):
        return None
    op = OPERATORS[n.op]
    if n.op in ("mms", "zsn"):
        return const(0.0)
    if not op.elementwise:  # rownorm/colnorm of a constant depends on the layer's shape
        return None
    args = [torch.tensor(float(k.value or 0.0), dtype=torch.float32) for k in n.children]
    return const(float(op.fn(*args)))


RULES: list[Rule] = [
    _neg_neg, _abs_neg, _abs_nonneg, _even_neg, _sqrt_sqr, _sqr_sqrt, _exp_log, _identity,
    _sub_self, _div_self, _mul_zero, _add_neg, _sub_neg, _mul_neg_neg, _normalise_twice, _fold,
]


# ----------------------------------------------------------------- rank-only (root) rules


@_rule("root_scale", "root mul/div by a constant c: c > 0 -> x, c < 0 -> neg x (affine)")
def _root_scale(n):
    if n.op not in ("mul", "div"):
        return None
    a, b = n.children
    pairs = [(b, a)] if n.op == "div" else [(a, b), (b, a)]
    for k, x in pairs:
        v = _c(k)
        if v is not None and v != 0.0:
            return x if v > 0 else call("neg", x)
    return None


@_rule("root_shift", "root add/sub of a constant: add(x, c), add(c, x), sub(x, c) -> x; "
       "sub(c, x) -> neg x (affine)")
def _root_shift(n):
    if n.op not in ("add", "sub"):
        return None
    a, b = n.children
    if b.is_const:
        return a
    if a.is_const:
        return b if n.op == "add" else call("neg", b)
    return None


@_rule("root_normalise", "root mms x, zsn x -> x (global increasing affine)")
def _root_normalise(n):
    return n.children[0] if n.op in ("mms", "zsn") else None


RANK_RULES: list[Rule] = [_root_scale, _root_shift, _root_normalise]


# ----------------------------------------------------------------------------------- driver

_MAX_STEPS = 200
_memo: dict[Node, Node] = {}


def _simplify(node: Node) -> Node:
    hit = _memo.get(node)
    if hit is not None:
        return hit
    out = node
    if node.children:
        out = Node(node.op, tuple(_simplify(c) for c in node.children))
        for _ in range(_MAX_STEPS):
            for rule in RULES:
                cand = rule.apply(out)
                if cand is None or cand == out:
                    continue
                cand = _simplify(cand)
                if cand.size() <= out.size():
                    out = cand
                    break
            else:
                break
    if len(_memo) > 100_000:
        _memo.clear()
    _memo[node] = out
    return out


def simplify(node: Node, rank_only: bool = True) -> Node:
    """Apply `RULES` bottom-up to a fixed point; with rank_only, also strip affine root transforms
    (`RANK_RULES`) that cannot change any ranking of the scores. Never increases the size."""
    node = _simplify(node)
    while rank_only:
        for rule in RANK_RULES:
            cand = rule.apply(node)
            if cand is not None:
                node = _simplify(cand)
                break
        else:
            break
    return node


# ---------------------------------------------------------------------------- canonical key

_keys: dict[tuple[str, bool], str] = {}


def _strip_affine(expr: sympy.Expr) -> sympy.Expr:
    """The sympy counterpart of RANK_RULES (sympy may expose new ones, e.g. W + W = 2*W)."""
    for _ in range(_MAX_STEPS):
        shift, rest = expr.as_coeff_Add()
        if shift != 0:
            expr = rest
            continue
        content, rest = expr.as_content_primitive()  # positive rational content, e.g. 2*W + 2*X
        if content != 1:
            expr = rest
            continue
        coeff, rest = expr.as_coeff_Mul()
        if coeff.is_negative and coeff != -1:  # -3*W ranks like -W (not like W)
            expr = -rest
            continue
        if expr.func in (_OPAQUE["mms"], _OPAQUE["zsn"]):
            expr = expr.args[0]
            continue
        break
    return expr


def canonical_key(node: Node, rank_only: bool = True) -> str:
    """A string equal for metrics that are equal in real arithmetic (away from the protection
    guards); with rank_only (default), also equal for metrics that differ by an increasing or
    decreasing global affine map, i.e. that prune the same weights.

    Built from sympy's automatic canonical form of the simplified tree (commutativity,
    collection of like terms); trees too large for sympy fall back to the simplified functional form.
    """
    fkey = (to_functional(node), rank_only)
    hit = _keys.get(fkey)
    if hit is not None:
        return hit
    tree = simplify(node, rank_only=rank_only)
    key = "tree:" + to_functional(tree)
    if tree.size() <= SYMPY_MAX_SIZE:
        try:
            expr = to_sympy(tree)
            if rank_only:
                expr = _strip_affine(expr)
            key = sympy.srepr(expr)
        except (RecursionError, ValueError, TypeError, ArithmeticError):
            pass  # keep the functional fallback: still a correct (if finer) key
    if len(_keys) > 100_000:
        _keys.clear()
    _keys[fkey] = key
    return key
