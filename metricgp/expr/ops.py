"""The one table of leaves and operators a metric may use.

Every consumer (parser, printers, compiler, sympy canonicaliser, DEAP primitive set, search-space
validation, property tests) reads this table; adding an operator is one `Operator(...)` entry.

All operators are *protected*: for finite input they return finite output of the broadcast shape,
never NaN or Inf. Metrics are evaluated in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The single divide-by-zero / log-of-zero guard. Pruner-Zero's released code uses 1e-3 inside log;
# we keep that for log (paper-faithful) and use PROTECT_EPS for every division.
PROTECT_EPS = 1e-8
LOG_EPS = 1e-3
# exp's input is clamped so that float32 never overflows (exp(88.7) is float32's max).
EXP_CLAMP = 80.0

Tensor = torch.Tensor


def _finite(t: Tensor) -> Tensor:
    """Map NaN to 0 and +-Inf to the dtype's extremes, so every operator stays finite."""
    big = torch.finfo(t.dtype).max if t.is_floating_point() else None
    return torch.nan_to_num(t, nan=0.0, posinf=big, neginf=-big if big is not None else None)


def _safe_denominator(y: Tensor) -> Tensor:
    # |y| below the guard becomes +-PROTECT_EPS, keeping y's sign (0 counts as positive).
    sign = torch.where(y < 0, -1.0, 1.0).to(y.dtype)
    return torch.where(y.abs() < PROTECT_EPS, sign * PROTECT_EPS, y)


def _div(x: Tensor, y: Tensor) -> Tensor:
    # Element-wise protected division. (Pruner-Zero's released `div` silently meant x / ||y||_F;
    # we keep div honest and element-wise.)
    return _finite(x / _safe_denominator(y))


def _mms(x: Tensor) -> Tensor:
    """Min-max scaling over the whole tensor; a constant tensor maps to zeros."""
    lo, hi = x.min(), x.max()
    span = _finite(hi - lo)
    if span <= 0:
        return torch.zeros_like(x)
    return _finite((x - lo) / span)


def _zsn(x: Tensor) -> Tensor:
    """Z-score over the whole tensor; a constant tensor maps to zeros."""
    x64 = x.double()  # avoid overflow of the variance for huge inputs
    mean = x64.mean()
    std = x64.std(unbiased=False) if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    if not torch.isfinite(std) or std <= 0:
        return torch.zeros_like(x)
    return _finite(((x64 - mean) / std).to(x.dtype))


def _rownorm(x: Tensor) -> Tensor:
    """x divided by the l1 norm of its row (RIA's 'relative importance' along the output row)."""
    return _finite(x / _safe_denominator(x.abs().sum(dim=-1, keepdim=True)))


def _colnorm(x: Tensor) -> Tensor:
    """x divided by the l1 norm of its column (RIA's term along the input feature)."""
    return _finite(x / _safe_denominator(x.abs().sum(dim=-2, keepdim=True))) if x.dim() >= 2 else x


@dataclass(frozen=True)
class Operator:
    """A primitive of the grammar.

    name:     the functional name (`mul`), also the DEAP primitive name.
    arity:    1 or 2.
    fn:       the protected tensor function.
    symbol:   infix symbol for binary operators ('+', '-', '*', '/'), else None.
    latex:    format string with {0}, {1} for the children's LaTeX.
    elementwise: False for operators that look at the whole tensor (mms, zsn, rownorm, colnorm);
              the sympy canonicaliser keeps those as opaque functions.
    doc:      one line for `--help` and the README.
    """

    name: str
    arity: int
    fn: Callable[..., Tensor]
    symbol: str | None = None
    latex: str = ""
    elementwise: bool = True
    doc: str = ""


@dataclass(frozen=True)
class Leaf:
    """A per-weight statistic of a linear layer."""

    name: str
    nonnegative: bool
    doc: str


LEAVES: dict[str, Leaf] = {
    leaf.name: leaf
    for leaf in (
        Leaf("W", False, "the weight matrix (out, in), signed"),
        Leaf("X", True, "mean squared input activation per input feature (1, in); Wanda uses sqrt(X)"),
        Leaf("G", True, "per-weight l2 norm of the causal-LM gradient over calibration windows (out, in)"),
    )
}


def _op(name, arity, fn, symbol=None, latex="", elementwise=True, doc=""):
    return Operator(name, arity, fn, symbol, latex, elementwise, doc)


OPERATORS: dict[str, Operator] = {
    o.name: o
    for o in (
        # unary (Pruner-Zero's set)
        _op("sqr", 1, lambda x: _finite(x * x), latex=r"\left({0}\right)^{{2}}", doc="x^2"),
        _op("neg", 1, lambda x: -x, latex=r"-\left({0}\right)", doc="-x"),
        _op("abs", 1, torch.abs, latex=r"\left|{0}\right|", doc="|x|"),
        _op("tanh", 1, torch.tanh, latex=r"\tanh\left({0}\right)", doc="tanh(x)"),
        _op("identity", 1, lambda x: x, latex="{0}", doc="x"),
        _op("log", 1, lambda x: torch.log(x.abs() + LOG_EPS), latex=r"\log\left({0}\right)",
            doc=f"log(|x| + {LOG_EPS:g})"),
        _op("exp", 1, lambda x: torch.exp(torch.clamp(x, max=EXP_CLAMP)), latex=r"e^{{{0}}}",
            doc=f"exp(min(x, {EXP_CLAMP:g}))"),
        _op("sqrt", 1, lambda x: torch.sqrt(x.abs()), latex=r"\sqrt{{{0}}}", doc="sqrt(|x|)"),
        _op("mms", 1, _mms, latex=r"\operatorname{{mms}}\left({0}\right)", elementwise=False,
            doc="min-max scaling over the whole tensor (constant -> 0)"),
        _op("zsn", 1, _zsn, latex=r"\operatorname{{zsn}}\left({0}\right)", elementwise=False,
            doc="z-score over the whole tensor (constant -> 0)"),
        # unary (extended space, RIA-style normalisations)
        _op("rownorm", 1, _rownorm, latex=r"\operatorname{{rown}}\left({0}\right)", elementwise=False,
            doc="x / l1 norm of its output row"),
        _op("colnorm", 1, _colnorm, latex=r"\operatorname{{coln}}\left({0}\right)", elementwise=False,
            doc="x / l1 norm of its input column"),
        # binary
        _op("add", 2, lambda x, y: _finite(x + y), "+", "{0} + {1}", doc="x + y"),
        _op("sub", 2, lambda x, y: _finite(x - y), "-", "{0} - {1}", doc="x - y"),
        _op("mul", 2, lambda x, y: _finite(x * y), "*", r"{0} \cdot {1}", doc="x * y"),
        _op("div", 2, _div, "/", r"\frac{{{0}}}{{{1}}}", doc=f"x / y, |y| floored at {PROTECT_EPS:g}"),
    )
}

# Infix symbol -> operator name, for the parser and the printer.
BINARY_SYMBOLS: dict[str, str] = {o.symbol: o.name for o in OPERATORS.values() if o.symbol}
