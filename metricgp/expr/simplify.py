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
- exp/tanh/sqrt at the root: monotone, but not affine, so they would change aggregated
  (structured) scores and merge distinct ties; only affine root transforms are ever stripped.

Scopes. `RULES` are exact and always apply. The root rules (`RANK_RULES`) change the scores but
not the ranking they induce, and how far that holds depends on how the scores are used; each
entry of `SCOPES` names the root rules that are valid for one use:

- "exact": none; the simplified tree computes the same function (printing, reports).
- "tensor": every root rule. Masks that rank the scores of ONE tensor (per-row or per-layer
  unstructured, N:M) cannot see a positive scale, a constant shift or a per-tensor increasing
  affine map (mms, zsn), and a negative scale ranks like neg.
- "global": only root_scale. When element scores are reduced over coupled structures (sum, mean,
  l2 norm or max over a head's rows and columns) and the structures are ranked across layers, a
  constant shift adds (structure size) * c, which reorders structures of different sizes, and
  mms/zsn apply different coefficients to each tensor, which reorders structures of different
  layers. A constant scale c is the same for every tensor, and the reductions are positively
  homogeneous: R(c * s) = c * R(s) for c > 0, so the order is kept. For c < 0, c * s = |c| * (-s)
  elementwise, so R(c * s) = |c| * R(neg s): c * s ranks exactly like neg(s) in every scope (which
  is what root_scale rewrites it to; it does NOT rank like s, nor like -R(s) for l2 or max).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from metricgp.expr.ops import LOG_EPS, OPERATORS, PROTECT_EPS
from metricgp.expr.printing import is_nonnegative, to_infix, to_latex, to_sympy
from metricgp.expr.tree import Node, call, const, to_functional

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


def _is_normalisation(node: Node) -> bool:
    op = OPERATORS.get(node.op)
    return op is not None and op.normalisation


@_rule("normalise_twice", "f(g x) -> f x for normalisations f, g (Operator.normalisation): mms(mms x), "
       "mms(zsn x) -> mms x; zsn(zsn x), zsn(mms x) -> zsn x (g is an increasing affine map, which f "
       "does not see; exact up to rounding)")
def _normalise_twice(n):
    if _is_normalisation(n) and _is_normalisation(n.children[0]):
        return call(n.op, n.children[0].children[0])
    return None


@_rule("fold", "an elementwise operator of constants -> the constant its protected float32 fn gives; "
       "a normalisation (mms, zsn) of a constant -> 0 (exact: the compiler evaluates constants the same way)")
def _fold(n):
    if not n.children or not all(k.is_const for k in n.children):
        return None
    op = OPERATORS[n.op]
    if op.normalisation:
        return const(0.0)
    if not op.elementwise:  # rownorm/colnorm of a constant depends on the layer's shape
        return None
    args = [torch.tensor(float(k.value or 0.0), dtype=torch.float32) for k in n.children]
    return const(float(op.fn(*args)))


RULES: list[Rule] = [
    _neg_neg, _abs_neg, _abs_nonneg, _even_neg, _sqrt_sqr, _sqr_sqrt, _exp_log, _identity,
    _sub_self, _div_self, _mul_zero, _add_neg, _sub_neg, _mul_neg_neg, _normalise_twice, _fold,
]


# --------------------------------------------------------------------- root (ranking) rules


@_rule("root_scale", "root mul/div by a constant c: c > 0 -> x, c < 0 -> neg x (positively "
       "homogeneous, the same for every tensor: valid in every non-exact scope)")
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
       "sub(c, x) -> neg x (a shift: keeps the order within one tensor, not of sums over structures "
       "of different sizes)")
def _root_shift(n):
    if n.op not in ("add", "sub"):
        return None
    a, b = n.children
    if b.is_const:
        return a
    if a.is_const:
        return b if n.op == "add" else call("neg", b)
    return None


@_rule("root_normalise", "root normalisation (mms x, zsn x) -> x (an increasing affine map with "
       "coefficients of its own tensor: keeps the order within one tensor only)")
def _root_normalise(n):
    return n.children[0] if _is_normalisation(n) else None


RANK_RULES: tuple[Rule, ...] = (_root_scale, _root_shift, _root_normalise)

# scope -> the root rules that keep the ranking the scope's masks depend on (see the module doc).
SCOPES: dict[str, tuple[Rule, ...]] = {
    "exact": (),
    "tensor": RANK_RULES,
    "global": (_root_scale,),
}
DEFAULT_SCOPE = "tensor"


def resolve_scope(scope: str | bool | None = DEFAULT_SCOPE, rank_only: bool | None = None) -> str:
    """A scope name from `scope`, or from the deprecated `rank_only` flag (True: "tensor",
    False: "exact"); a bool given as `scope` is read as rank_only."""
    if isinstance(scope, bool):
        scope, rank_only = None, scope
    if rank_only is not None:
        warnings.warn("rank_only= is deprecated; pass scope='tensor' (True) or scope='exact' (False)",
                      DeprecationWarning, stacklevel=3)
        if scope not in (None, DEFAULT_SCOPE):
            raise ValueError(f"give scope or rank_only, not both (scope={scope!r}, rank_only={rank_only})")
        return "tensor" if rank_only else "exact"
    scope = DEFAULT_SCOPE if scope is None else scope
    if scope not in SCOPES:
        raise ValueError(f"unknown simplification scope {scope!r} (choose from {', '.join(SCOPES)})")
    return scope


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


def simplify(node: Node, scope: str = DEFAULT_SCOPE, *, rank_only: bool | None = None) -> Node:
    """Apply `RULES` bottom-up to a fixed point, then the root rules of `scope` (`SCOPES`), which
    cannot change the ranking that scope's masks see. Never increases the size.

    `rank_only` is deprecated: True is scope="tensor", False is scope="exact"."""
    rules = SCOPES[resolve_scope(scope, rank_only)]
    node = _simplify(node)
    while rules:
        for rule in rules:
            cand = rule.apply(node)
            if cand is not None:
                node = _simplify(cand)
                break
        else:
            break
    return node


# ---------------------------------------------------------------------------- canonical key

_keys: dict[tuple[str, str], str] = {}


def _sympy_shift(expr: sympy.Expr) -> sympy.Expr | None:
    shift, rest = expr.as_coeff_Add()
    return rest if shift != 0 else None


def _sympy_scale(expr: sympy.Expr) -> sympy.Expr | None:
    content, rest = expr.as_content_primitive()  # positive rational content, e.g. 2*W + 2*X
    if content != 1:
        return rest
    coeff, rest = expr.as_coeff_Mul()
    if coeff.is_negative and coeff != -1:  # -3*W ranks like -W (not like W)
        return -rest
    return None


def _sympy_normalise(expr: sympy.Expr) -> sympy.Expr | None:
    op = OPERATORS.get(getattr(expr.func, "__name__", ""))
    if op is not None and op.normalisation and op.sympy_fn is None and len(expr.args) == 1:
        return expr.args[0]
    return None


# The sympy counterparts of the root rules (sympy may expose new ones, e.g. W + W = 2*W), in the
# order they are tried.
_SYMPY_ROOT: tuple[tuple[Rule, Callable[[sympy.Expr], sympy.Expr | None]], ...] = (
    (_root_shift, _sympy_shift),
    (_root_scale, _sympy_scale),
    (_root_normalise, _sympy_normalise),
)


def _strip_affine(expr: sympy.Expr, rules: tuple[Rule, ...]) -> sympy.Expr:
    """Strip, at the root of `expr`, what the root `rules` strip from a tree, to a fixed point."""
    steps = [fn for rule, fn in _SYMPY_ROOT if rule in rules]
    for _ in range(_MAX_STEPS):
        for step in steps:
            out = step(expr)
            if out is not None:
                expr = out
                break
        else:
            break
    return expr


def canonical_key(node: Node, scope: str = DEFAULT_SCOPE, *, rank_only: bool | None = None) -> str:
    """A string equal for metrics that are equal in real arithmetic (away from the protection
    guards), and under a non-exact `scope` (default "tensor") also for metrics that differ by a
    root transform of that scope's rules (`SCOPES`), i.e. that prune the same weights there.

    Built from sympy's automatic canonical form of the simplified tree (commutativity,
    collection of like terms); trees too large for sympy fall back to the simplified functional form.
    `rank_only` is deprecated: True is scope="tensor", False is scope="exact".
    """
    scope = resolve_scope(scope, rank_only)
    fkey = (to_functional(node), scope)
    hit = _keys.get(fkey)
    if hit is not None:
        return hit
    tree = simplify(node, scope)
    key = "tree:" + to_functional(tree)
    if tree.size() <= SYMPY_MAX_SIZE:
        try:
            key = sympy.srepr(_strip_affine(to_sympy(tree), SCOPES[scope]))
        except (RecursionError, ValueError, TypeError, ArithmeticError):
            pass  # keep the functional fallback: still a correct (if finer) key
    if len(_keys) > 100_000:
        _keys.clear()
    _keys[fkey] = key
    return key


_SYMPY_STR: dict[str, str] = {}


def _sympy_str(node: Node) -> str:
    """str of the simplified sympy form (same function, not rank-reduced); cached by formula."""
    key = to_functional(node)
    if key not in _SYMPY_STR:
        tree = simplify(node, scope="exact")
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
