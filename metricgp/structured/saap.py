"""SAAP (arXiv 2412.15127): fused importance with learned uncertainty, and a stability-driven keep map.

The paper's exact formulas are not public; this is the reference design of the issue. Notation:
k an estimator (`saap_estimators.ESTIMATORS`, or a metric formula), b a calibration window
(B of them), j a structure (query head, KV head or MLP channel) with c_j pooled weights, m a
prunable module (one attention or MLP of one block).

    e_kbj  = estimator k's score of structure j on window b         (saap_estimators)
    I_kbj  = (e_kbj / c_j) / mean_{b',j'} (e_kb'j' / c_j')           normalised importance, mean 1
    L_k    = mean_j var_b I_kbj                                      inconsistency across windows
    L'_k   = max(L_k, min_{k': L_k' > 0} L_k')                       a window-independent estimator
                                                                     (magnitude: L = 0) is trusted
                                                                     as much as the steadiest one
    sigma  = argmin_s sum_k L'_k / (2 sigma_k^2) + log sigma_k       (Kendall et al. 2018), learned
                                                                     by gradient descent on log sigma;
                                                                     the optimum is sigma_k^2 = L'_k
    F_bj   = sum_k I_kbj / (2 sigma_k^2),   F_j = mean_b F_bj        fused importance (`FUSIONS`)

Adaptive structure search, for a target of kept decoder parameters:

    S_m    = mean_{j in m} std_b F_bj / mean_{j in m} F_j            stability indicator (fluctuation)
    A_m    = sum_{j in m} c_j F_j / sum_{j in m} c_j                 module importance
    rho_m  = (rank(A_m) + rank(S_m)) / (2 (M - 1))  in [0, 1]        ranks ascending, ties averaged
    pi_m   = 1 + spread (1 - 2 rho_m)                                pruning propensity
    removed fraction of m  ~  pi_m                                   water-filling: the next unit goes
                                                                     from the module with the smallest
                                                                     (removed_m + unit) / (size_m pi_m)

so less important, more stable modules lose more. Units are removed while the kept count stays at
or above the target, so it ends within one unit of it; each module keeps at least one unit; with
`skip_edge_blocks` the first and last blocks are untouched. The result is a keep map (fraction of
units kept per module) that the evaluator turns into a plan; within a module the least important
units (by F) go. Estimators pool by their own rule (a sum over the structure), so `spec.reduction`
is not used; `spec.normalisation` and `spec.head_mode` are. In `metricgp.structured.evaluator`,
"saap" is an importance (`UNIT_IMPORTANCES`, here) and "stability" an allocation (`PLANNERS`,
`saap_search`); both read their options (`SAAPOptions`) from `spec.options`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

import torch

from metricgp.errors import MetricGPError
from metricgp.structured.importance import REDUCTIONS, Partial, Unit, module_units, normalise
from metricgp.structured.saap_estimators import DEFAULT_ESTIMATORS, Estimator, parse_estimators

SIGMA_STEPS = 500  # gradient steps on log sigma (the loss is convex in log sigma)
SIGMA_LR = 0.25  # stable: started at the largest sigma every gradient is in (0, 1]


@dataclass(frozen=True)
class SAAPOptions:
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    fusion: str = "uncertainty"
    skip_edge_blocks: bool = False  # leave the first and last decoder blocks untouched
    spread: float = 0.5  # 0: the same ratio everywhere; 1: the most important, least stable kept whole

    @classmethod
    def from_dict(cls, options: Mapping | None) -> SAAPOptions:
        options = dict(options or {})
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise MetricGPError(f"unknown SAAP option(s) {', '.join(unknown)}")
        if "estimators" in options:
            options["estimators"] = tuple(options["estimators"])
        return cls(**options).validate()

    def validate(self) -> SAAPOptions:
        self.parsed()
        if self.fusion not in FUSIONS:
            raise MetricGPError(f"unknown fusion '{self.fusion}' (choose from {', '.join(FUSIONS)})")
        if not 0.0 <= self.spread <= 1.0:
            raise MetricGPError(f"SAAP spread must be in [0, 1], got {self.spread}")
        return self

    def parsed(self) -> list[Estimator]:
        return parse_estimators(self.estimators)

    def to_dict(self) -> dict:
        return {**asdict(self), "estimators": list(self.estimators)}


@dataclass(frozen=True)
class Fusion:
    weights: torch.Tensor  # (K,) coefficient of each estimator in the fused importance
    sigma: torch.Tensor  # (K,)
    inconsistency: torch.Tensor  # (K,) L_k


def normalised(scores: torch.Tensor, sizes: torch.Tensor, names: list[str]) -> torch.Tensor:
    """I_kbj from e_kbj (K, B, N) and c_j (N,): per weight, then relative to the estimator's mean."""
    per = scores.double() / sizes
    mean = per.mean(dim=(1, 2), keepdim=True)
    for name, m, finite in zip(names, mean.flatten().tolist(), per.isfinite().flatten(1).all(1).tolist(),
                               strict=True):
        if not finite or not m > 0:
            raise MetricGPError(f"estimator '{name}' gives {'non-finite' if not finite else 'no positive'} "
                                "structure importance")
    return per / mean


def inconsistency(importance: torch.Tensor) -> torch.Tensor:
    """L_k: the mean over structures of the variance across windows."""
    return importance.var(dim=1, unbiased=False).mean(dim=1)


def learn_log_sigma(loss: torch.Tensor, steps: int = SIGMA_STEPS, lr: float = SIGMA_LR) -> torch.Tensor:
    """argmin over log sigma of sum_k L_k / (2 sigma_k^2) + log sigma_k (L_k > 0), by gradient descent."""
    s = torch.full_like(loss, float(loss.max().log() / 2), requires_grad=True)
    opt = torch.optim.SGD([s], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (loss / (2 * torch.exp(2 * s)) + s).sum().backward()
        opt.step()
    return s.detach()


def uncertainty_fusion(importance: torch.Tensor) -> Fusion:
    """Homoscedastic uncertainty weighting (Kendall et al. 2018); weights 1 / (2 sigma_k^2)."""
    loss = inconsistency(importance)
    positive = loss[loss > 0]
    floored = loss.clamp_min(positive.min() if len(positive) else 1.0)
    sigma = learn_log_sigma(floored).exp()
    return Fusion(1 / (2 * sigma.square()), sigma, loss)


def mean_fusion(importance: torch.Tensor) -> Fusion:
    """Equal weights (an ablation): sigma_k^2 = K / 2 for every estimator."""
    k = importance.shape[0]
    sigma = torch.full((k,), (k / 2) ** 0.5, dtype=importance.dtype)
    return Fusion(1 / (2 * sigma.square()), sigma, inconsistency(importance))


# name -> fn(I (K, B, N)) -> Fusion; the fused importance is sum_k weights_k I_k
FUSIONS: dict[str, Callable[[torch.Tensor], Fusion]] = {"uncertainty": uncertainty_fusion, "mean": mean_fusion}


@dataclass
class Analysis:
    """Per-window fused importance of every structure, and how it was fused."""

    fused: torch.Tensor  # (B, N) F_bj
    sizes: torch.Tensor  # (N,) c_j
    offsets: dict[str, tuple[int, int, int]]  # module -> (start, n_elements, n_kv) in the layout
    fusion: Fusion
    names: list[str]
    cached: bool


def analyse(pruner, options: SAAPOptions) -> Analysis:
    """The per-window scores (cached on disk), normalised and fused; memoised on the pruner."""
    from metricgp.structured.saap_estimators import cached_batch_scores, structure_sizes

    memo_key = f"saap:{options.estimators}:{options.fusion}"
    if memo_key not in pruner.memo:
        estimators = options.parsed()
        scores, cached = cached_batch_scores(pruner.setup, pruner.modules, pruner.linears, estimators)
        sizes = structure_sizes(pruner.modules, pruner.linears)
        names = [e.name for e in estimators]
        importance = normalised(scores, sizes, names)
        fusion = FUSIONS[options.fusion](importance)
        offsets, start = {}, 0
        for m in pruner.modules:
            offsets[m.name] = (start, m.n_elements, m.n_kv)
            start += m.n_elements + m.n_kv
        fused = torch.einsum("k,kbn->bn", fusion.weights, importance)
        pruner.memo[memo_key] = Analysis(fused, sizes, offsets, fusion, names, cached)
    return pruner.memo[memo_key]


def fusion_notes(a: Analysis) -> dict:
    share = a.fusion.weights / a.fusion.weights.sum()
    return {name: {"sigma": float(a.fusion.sigma[i]), "weight": float(a.fusion.weights[i]),
                   "share": float(share[i]), "inconsistency": float(a.fusion.inconsistency[i])}
            for i, name in enumerate(a.names)}


def saap_units(pruner, tree, spec) -> list[Unit]:
    """Units of every module scored by the fused importance F_j (`UNIT_IMPORTANCES["saap"]`)."""
    options = SAAPOptions.from_dict(spec.options)
    a = analyse(pruner, options)
    mean = a.fused.mean(dim=0) * a.sizes  # pooled like a sum reduction: c_j F_j
    units = []
    for m in pruner.modules:
        start, n, kv = a.offsets[m.name]
        part = Partial(mean[start:start + n], a.sizes[start:start + n], mean[start + n:start + n + kv],
                       a.sizes[start + n:start + n + kv])
        units += module_units(m, part, pruner.linears, REDUCTIONS["sum"], spec.head_mode)
    pruner.notes.setdefault("saap", {}).update(
        {"options": options.to_dict(), "fusion": fusion_notes(a), "scores_cached": a.cached})
    return normalise(units, spec.normalisation)
