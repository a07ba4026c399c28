"""The one table of leaves and operators a metric may use.

Every consumer (parser, printers, compiler, sympy canonicaliser, DEAP primitive set, search-space
validation, property tests) reads this table; adding an operator is one `Operator(...)` entry.

All operators are *protected*: for finite input they return finite output of the broadcast shape,
never NaN or Inf. Metrics are evaluated in float32.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sympy
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


def _meannorm(x: Tensor) -> Tensor:
    """x divided by the mean of |x| over the whole tensor: a per-layer rescaling of a statistic,
    so a metric built from meannorm'd terms does not depend on that layer's scale."""
    return _finite(x / _safe_denominator(x.abs().mean()))


def _colnorm(x: Tensor) -> Tensor:
    """x divided by the l1 norm of its column (RIA's term along the input feature)."""
    return _finite(x / _safe_denominator(x.abs().sum(dim=-2, keepdim=True))) if x.dim() >= 2 else x


# Binding strength of printed symbols: infix operators bind by their `precedence`, a prefix
# operator (neg's '-') binds tighter than any infix one, and calls, leaves and constants tightest.
PRECEDENCE_PREFIX = 3
PRECEDENCE_ATOM = 4

# Sign facts, for the simplifier's `is_nonnegative` (and sympy's assumptions on opaque functions).
NONNEGATIVE = "nonnegative"  # the output is >= 0 for every finite input
FOLLOWS = "follows"  # the output is >= 0 whenever every argument is
ANY_SIGN = "any"
SIGNS = (NONNEGATIVE, FOLLOWS, ANY_SIGN)


@dataclass(frozen=True)
class Operator:
    r"""A primitive of the grammar: everything the parser, printers, compiler, simplifier and the
    search know about it. Only `name`, `arity` and `fn` are required; the defaults make a new
    operator a function call everywhere (printed `name(x)`, opaque to sympy, of unknown sign).

    name:       the functional name (`mul`), also the DEAP primitive name.
    arity:      1 or 2.
    fn:         the protected tensor function.
    symbol:     binary: infix symbol ('+', '-', '*', '/'); unary: prefix symbol (neg's '-'); else None.
                Parsed and printed; binary symbols associate to the left.
    precedence: binding strength of the symbol (higher binds tighter); PRECEDENCE_ATOM for calls.
    latex:      format string with {0}, {1} for the children's LaTeX (default \operatorname{name}(...)).
    latex_grouped: the LaTeX template delimits its arguments itself (\frac), so an infix operator's
                children never need parentheses there.
    sympy_fn:   the closed elementwise form on sympy expressions; None: an opaque sympy function
                (whole-tensor operators, or an operator sympy should not look into).
    sympy_fn_nonneg: a cheaper closed form for an argument known to be >= 0 (skips sympy's slow sign
                queries on Abs), or None.
    sign:       NONNEGATIVE, FOLLOWS or ANY_SIGN (see above).
    elementwise: False for operators that look at the whole tensor (mms, zsn, rownorm, colnorm).
    normalisation: a per-tensor increasing affine map of its input (mms, zsn): invariant under
                such maps itself, and 0 on a constant tensor. The simplifier's normalise_twice,
                fold and root_normalise rules read it.
    doc:        one line for `--help` and the README.
    """

    name: str
    arity: int
    fn: Callable[..., Tensor]
    symbol: str | None = None
    precedence: int = PRECEDENCE_ATOM
    latex: str = ""
    latex_grouped: bool = False
    sympy_fn: Callable[..., sympy.Expr] | None = None
    sympy_fn_nonneg: Callable[..., sympy.Expr] | None = None
    sign: str = ANY_SIGN
    elementwise: bool = True
    normalisation: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.arity not in (1, 2):
            raise ValueError(f"operator {self.name!r}: arity must be 1 or 2, got {self.arity}")
        if self.sign not in SIGNS:
            raise ValueError(f"operator {self.name!r}: sign must be one of {SIGNS}, got {self.sign!r}")
        if not self.latex:
            args = ", ".join(f"{{{i}}}" for i in range(self.arity))
            object.__setattr__(self, "latex", rf"\operatorname{{{{{self.name}}}}}\left({args}\right)")


@dataclass(frozen=True)
class Statistic:
    """How a leaf is accumulated over calibration data, one layer at a time: `start(shape, device)`
    makes the running state, `add(state, t)` folds in one batch (in place), `finish(state, count)`
    turns it into the leaf. For an "inputs" leaf t is the layer's input (tokens, in_features) in
    float32, shape is (in_features,) and count the number of tokens; for a "gradients" leaf t is
    the weight's gradient of one window, shape is W's and count the number of windows."""

    start: Callable[[tuple[int, ...], torch.device], Tensor]
    add: Callable[[Tensor, Tensor], object]
    finish: Callable[[Tensor, int], Tensor]


# SparseGPT's dampening: lambda = HESSIAN_DAMP * mean(diag H) is added to H's diagonal before inversion.
HESSIAN_DAMP = 0.01


def _inverse_hessian_diagonal(gram: Tensor, tokens: int) -> Tensor:
    """diag((XᵀX/n + lambda I)^-1) as (1, in); a feature that never fires gets H_jj = 1 (SparseGPT).
    In float64, in place where it can be: for a 14336-wide down_proj one float64 copy is 1.6 GB, so
    the diagonal of the inverse is read off the Cholesky factor a block of columns at a time
    (diag(H^-1)_j = ||L^-1 e_j||^2) instead of forming H^-1."""
    h = gram.double().div_(max(tokens, 1))
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    undamped = diag.clone()
    damp = HESSIAN_DAMP * float(undamped.mean())
    for _ in range(6):  # raise the dampening until H is numerically positive definite
        diag.copy_(undamped + damp)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h
            n, step = chol.shape[0], 1024
            out = torch.empty(n, dtype=chol.dtype, device=chol.device)
            for first in range(0, n, step):
                cols = torch.zeros(n, min(step, n - first), dtype=chol.dtype, device=chol.device)
                cols[first : first + step].fill_diagonal_(1.0)
                out[first : first + step] = torch.linalg.solve_triangular(chol, cols, upper=False).square().sum(0)
            return out.float().unsqueeze(0)
        damp *= 10.0
    raise ValueError("input Hessian is not positive definite even after dampening")


MEAN_SQUARE = Statistic(start=lambda shape, dev: torch.zeros(shape, device=dev),
                        add=lambda s, x: s.add_(x.square().sum(dim=0)),
                        finish=lambda s, n: (s / max(n, 1)).unsqueeze(0))
INVERSE_HESSIAN_DIAGONAL = Statistic(start=lambda shape, dev: torch.zeros(shape * 2, device=dev),
                                     add=lambda s, x: s.addmm_(x.T, x),
                                     finish=_inverse_hessian_diagonal)
GRADIENT_NORM = Statistic(start=lambda shape, dev: torch.zeros(shape, device=dev),
                          add=lambda s, g: s.add_(g.float().square()),
                          finish=lambda s, n: s.sqrt())

SOURCES = ("weight", "inputs", "gradients")


@dataclass(frozen=True)
class Leaf:
    """A per-weight statistic of a linear layer: the one record the parser, printers, compiler,
    statistics pass and cache, and search spaces read, so a new leaf is one entry in `LEAVES`.

    source:    "weight" (read from the layer), "inputs" (accumulated from the layer's calibration
               inputs by `statistic`) or "gradients" (from the per-window gradients of its weight,
               which need a backward pass).
    latex:     how the printers write it in LaTeX (default: the name).
    """

    name: str
    nonnegative: bool
    doc: str
    source: str = "weight"
    statistic: Statistic | None = None
    latex: str = ""  # default: the name

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"leaf {self.name!r}: source must be one of {SOURCES}, got {self.source!r}")
        if (self.source == "weight") != (self.statistic is None):
            raise ValueError(f"leaf {self.name!r}: a statistic is needed exactly when source is not 'weight'")


LEAVES: dict[str, Leaf] = {
    leaf.name: leaf
    for leaf in (
        Leaf("W", False, "the weight matrix (out, in), signed"),
        Leaf("X", True, "mean squared input activation per input feature (1, in); Wanda uses sqrt(X)",
             "inputs", MEAN_SQUARE),
        Leaf("G", True, "per-weight l2 norm of the causal-LM gradient over calibration windows (out, in)",
             "gradients", GRADIENT_NORM),
        Leaf("Hinv", True, f"diagonal of the damped inverse input Hessian, [(XᵀX/n + λI)⁻¹]_jj with "
             f"λ = {HESSIAN_DAMP:g}·mean diag (1, in); SparseGPT's saliency is W²/Hinv",
             "inputs", INVERSE_HESSIAN_DIAGONAL, r"\left[H^{-1}\right]_{jj}"),
    )
}


def leaves_from(source: str, names: Iterable[str] | None = None) -> dict[str, Leaf]:
    """The leaves of one source (restricted to `names` when given), in registry order."""
    wanted = None if names is None else set(names)
    return {n: lf for n, lf in LEAVES.items() if lf.source == source and (wanted is None or n in wanted)}


_LOG_EPS_EXACT = sympy.Rational(repr(LOG_EPS))  # 1/1000: the protected log is exactly log(|x| + 1/1000)

OPERATORS: dict[str, Operator] = {
    o.name: o
    for o in (
        # unary (Pruner-Zero's set)
        Operator("sqr", 1, lambda x: _finite(x * x), latex=r"\left({0}\right)^{{2}}", sympy_fn=lambda a: a**2,
                 sign=NONNEGATIVE, doc="x^2"),
        Operator("neg", 1, lambda x: -x, "-", PRECEDENCE_PREFIX, r"-\left({0}\right)", sympy_fn=lambda a: -a,
                 doc="-x"),
        Operator("abs", 1, torch.abs, latex=r"\left|{0}\right|", sympy_fn=sympy.Abs, sympy_fn_nonneg=lambda a: a,
                 sign=NONNEGATIVE, doc="|x|"),
        Operator("tanh", 1, torch.tanh, latex=r"\tanh\left({0}\right)", sympy_fn=sympy.tanh, sign=FOLLOWS,
                 doc="tanh(x)"),
        Operator("identity", 1, lambda x: x, latex="{0}", sympy_fn=lambda a: a, sign=FOLLOWS, doc="x"),
        # The protected log is exactly this, so log(exp(x)) is (rightly) not cancelled by sympy.
        Operator("log", 1, lambda x: torch.log(x.abs() + LOG_EPS), latex=r"\log\left({0}\right)",
                 sympy_fn=lambda a: sympy.log(sympy.Abs(a) + _LOG_EPS_EXACT),
                 sympy_fn_nonneg=lambda a: sympy.log(a + _LOG_EPS_EXACT), doc=f"log(|x| + {LOG_EPS:g})"),
        # clamped only beyond e^80, which sympy's exp ignores
        Operator("exp", 1, lambda x: torch.exp(torch.clamp(x, max=EXP_CLAMP)), latex=r"e^{{{0}}}",
                 sympy_fn=sympy.exp, sign=NONNEGATIVE, doc=f"exp(min(x, {EXP_CLAMP:g}))"),
        Operator("sqrt", 1, lambda x: torch.sqrt(x.abs()), latex=r"\sqrt{{{0}}}",
                 sympy_fn=lambda a: sympy.sqrt(sympy.Abs(a)), sympy_fn_nonneg=sympy.sqrt, sign=NONNEGATIVE,
                 doc="sqrt(|x|)"),
        Operator("mms", 1, _mms, latex=r"\operatorname{{mms}}\left({0}\right)", sign=NONNEGATIVE,
                 elementwise=False, normalisation=True,
                 doc="min-max scaling over the whole tensor (constant -> 0)"),
        Operator("zsn", 1, _zsn, latex=r"\operatorname{{zsn}}\left({0}\right)", elementwise=False,
                 normalisation=True, doc="z-score over the whole tensor (constant -> 0)"),
        # unary (extended space, RIA-style normalisations)
        Operator("rownorm", 1, _rownorm, latex=r"\operatorname{{rown}}\left({0}\right)", sign=FOLLOWS,
                 elementwise=False, doc="x / l1 norm of its output row"),
        Operator("colnorm", 1, _colnorm, latex=r"\operatorname{{coln}}\left({0}\right)", sign=FOLLOWS,
                 elementwise=False, doc="x / l1 norm of its input column"),
        # unary (scale-free leaves: each statistic relative to its per-layer mean)
        Operator("meannorm", 1, _meannorm, latex=r"\operatorname{{meann}}\left({0}\right)", sign=FOLLOWS,
                 elementwise=False, doc="x / mean |x| over the whole tensor (per-layer scale removed)"),
        # binary
        Operator("add", 2, lambda x, y: _finite(x + y), "+", 1, "{0} + {1}", sympy_fn=operator.add, sign=FOLLOWS,
                 doc="x + y"),
        Operator("sub", 2, lambda x, y: _finite(x - y), "-", 1, "{0} - {1}", sympy_fn=operator.sub, doc="x - y"),
        Operator("mul", 2, lambda x, y: _finite(x * y), "*", 2, r"{0} \cdot {1}", sympy_fn=operator.mul,
                 sign=FOLLOWS, doc="x * y"),
        # sympy's a / b is the protected div away from |b| < PROTECT_EPS; a >= 0 denominator is
        # floored at +PROTECT_EPS, so div follows the sign of its arguments.
        Operator("div", 2, _div, "/", 2, r"\frac{{{0}}}{{{1}}}", latex_grouped=True, sympy_fn=operator.truediv,
                 sign=FOLLOWS, doc=f"x / y, |y| floored at {PROTECT_EPS:g}"),
    )
}


def binary_symbols() -> dict[str, str]:
    """Infix symbol -> operator name, read from `OPERATORS` (for the parser)."""
    return {o.symbol: o.name for o in OPERATORS.values() if o.symbol and o.arity == 2}


def prefix_symbols() -> dict[str, str]:
    """Prefix symbol -> operator name, read from `OPERATORS` (for the parser)."""
    return {o.symbol: o.name for o in OPERATORS.values() if o.symbol and o.arity == 1}
