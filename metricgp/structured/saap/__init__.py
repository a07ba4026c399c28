"""SAAP (arXiv 2412.15127): fused importance with learned uncertainty, and a stability-driven keep map.

The paper's exact formulas are not public; this is the reference design of the issue. Notation:
k an estimator (`saap_estimators.ESTIMATORS`, or a metric formula), b a calibration window
(B of them), j a structure (query head, KV head or MLP channel) with c_j pooled weights, m a
prunable module (one attention or MLP of one block).

    e_kbj  = estimator k's score of structure j on window b         (saap_estimators)
    I_kbj  = (e_kbj / c_j) / mean_{b',j'} (e_kb'j' / c_j')           normalised importance, mean 1
    O_p    = measured loss increase per weight of probe p            (saap_probes: a query head or a
                                                                     head-sized run of channels zeroed,
                                                                     on held-out calibration windows)
    I_kbp  = sum_{j in p} c_j I_kbj / sum_{j in p} c_j               the estimator's view of probe p
    r(.)   = rank over the P probes, scaled to [0, 1]
    L_k    = mean_b mean_p (r(I_kb.)_p - r(O)_p)^2                   the estimator's error: its rank
                                                                     disagreement with the measurement,
                                                                     = variance across windows + bias
    sigma  = argmin_s sum_k L_k / (2 sigma_k^2) + log sigma_k        (Kendall et al. 2018), learned
                                                                     by gradient descent on log sigma;
                                                                     the optimum is sigma_k^2 = L_k
    F_bj   = sum_k I_kbj / (2 sigma_k^2),   F_j = mean_b F_bj        fused importance (`FUSIONS`)

Why the measurement: a task loss in Kendall et al. says how wrong a task is. The earlier reference
form (fusion "consistency", kept as an ablation) used only the variance across windows,
L_k = mean_j var_b I_kbj, and a window-independent estimator (magnitude: L = 0) then got the
largest weight although it ranks structures worst. The rank error keeps that variance (an
estimator that reorders structures from window to window is wrong on some windows) and adds the
bias a steady but poor estimator has. A perfect ranking on every window (L_k = 0) is floored at the
smallest positive L_k.

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
`saap.allocation`); both read their options (`SAAPOptions`) from `spec.options`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

import torch

from metricgp.errors import MetricGPError
from metricgp.ranking import spearman
from metricgp.structured.importance import REDUCTIONS, Partial, Unit, module_units, normalise
from metricgp.structured.saap.estimators import (
    DEFAULT_ESTIMATORS,
    Estimator,
    cached_batch_scores,
    parse_estimators,
    structure_sizes,
)
from metricgp.structured.saap.probes import cached_probe_deltas, probe_importance, probe_membership

SIGMA_STEPS = 500  # gradient steps on log sigma (the loss is convex in log sigma)
SIGMA_LR = 0.25  # stable: started at the largest sigma every gradient is in (0, 1]


@dataclass(frozen=True)
class SAAPOptions:
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    fusion: str = "uncertainty"
    skip_edge_blocks: bool = False  # leave the first and last decoder blocks untouched
    spread: float = 0.5  # 0: the same ratio everywhere; 1: the most important, least stable kept whole
    probes_per_module: int = 1  # measured probes per module (fusions that need them)
    probe_windows: int = 2  # held-out calibration windows each probe is measured on

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
        if self.probes_per_module < 1 or self.probe_windows < 1:
            raise MetricGPError(f"SAAP probes_per_module and probe_windows must be >= 1, got "
                                f"{self.probes_per_module} and {self.probe_windows}")
        return self

    def parsed(self) -> list[Estimator]:
        return parse_estimators(self.estimators)

    def to_dict(self) -> dict:
        return {**asdict(self), "estimators": list(self.estimators)}


@dataclass(frozen=True)
class FusionInput:
    importance: torch.Tensor  # (K, B, N) I_kbj
    probe_importance: torch.Tensor | None = None  # (K, B, P) I_kbp
    oracle: torch.Tensor | None = None  # (P,) O_p


@dataclass(frozen=True)
class Fusion:
    weights: torch.Tensor  # (K,) coefficient of each estimator in the fused importance
    sigma: torch.Tensor  # (K,)
    loss: torch.Tensor  # (K,) L_k, what sigma was learned from
    inconsistency: torch.Tensor  # (K,) mean_j var_b I_kbj (a diagnostic for every fusion)


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
    """The mean over structures of the variance across windows."""
    return importance.var(dim=1, unbiased=False).mean(dim=1)


def scaled_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, scaled to [0, 1] (ties by position: scores are continuous)."""
    n = x.shape[-1]
    return x.argsort(dim=-1, stable=True).argsort(dim=-1).to(torch.float64) / max(n - 1, 1)


def rank_error(probe_importance: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """L_k: mean over windows and probes of the squared difference of scaled ranks to the measurement."""
    return (scaled_ranks(probe_importance) - scaled_ranks(oracle)).square().mean(dim=(1, 2))


def learn_log_sigma(loss: torch.Tensor, steps: int = SIGMA_STEPS, lr: float = SIGMA_LR) -> torch.Tensor:
    """argmin over log sigma of sum_k L_k / (2 sigma_k^2) + log sigma_k (L_k > 0), by gradient descent."""
    s = torch.full_like(loss, float(loss.max().log() / 2), requires_grad=True)
    opt = torch.optim.SGD([s], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (loss / (2 * torch.exp(2 * s)) + s).sum().backward()
        opt.step()
    return s.detach()


def _kendall(loss: torch.Tensor, importance: torch.Tensor) -> Fusion:
    """Homoscedastic uncertainty weighting of task losses L_k: weights 1 / (2 sigma_k^2)."""
    positive = loss[loss > 0]
    floored = loss.clamp_min(positive.min() if len(positive) else 1.0)
    sigma = learn_log_sigma(floored).exp()
    return Fusion(1 / (2 * sigma.square()), sigma, loss, inconsistency(importance))


def uncertainty_fusion(x: FusionInput) -> Fusion:
    """Kendall weights from each estimator's rank error against the measured probes."""
    if x.probe_importance is None or x.oracle is None:
        raise MetricGPError("the uncertainty fusion needs measured probes (saap.probes)")
    return _kendall(rank_error(x.probe_importance, x.oracle), x.importance)


def consistency_fusion(x: FusionInput) -> Fusion:
    """Kendall weights from the variance across windows alone (an ablation: rewards steady estimators)."""
    return _kendall(inconsistency(x.importance), x.importance)


def mean_fusion(x: FusionInput) -> Fusion:
    """Equal weights (an ablation): sigma_k^2 = K / 2 for every estimator."""
    k = x.importance.shape[0]
    sigma = torch.full((k,), (k / 2) ** 0.5, dtype=x.importance.dtype)
    return Fusion(1 / (2 * sigma.square()), sigma, torch.full_like(sigma, float("nan")), inconsistency(x.importance))


@dataclass(frozen=True)
class FusionRule:
    fn: Callable[[FusionInput], Fusion]
    needs_probes: bool


# name -> rule; the fused importance is sum_k weights_k I_k
FUSIONS: dict[str, FusionRule] = {"uncertainty": FusionRule(uncertainty_fusion, True),
                                  "consistency": FusionRule(consistency_fusion, False),
                                  "mean": FusionRule(mean_fusion, False)}


@dataclass
class Analysis:
    """Per-window fused importance of every structure, and how it was fused."""

    fused: torch.Tensor  # (B, N) F_bj
    sizes: torch.Tensor  # (N,) c_j
    offsets: dict[str, tuple[int, int, int]]  # module -> (start, n_elements, n_kv) in the layout
    fusion: Fusion
    names: list[str]
    cached: bool
    probe_spearman: list[float | None] | None = None  # per estimator: its window-mean probe ranking vs O_p


def analyse(pruner, options: SAAPOptions) -> Analysis:
    """The per-window scores (cached on disk), normalised and fused; memoised on the pruner."""
    memo_key = f"saap:{options.estimators}:{options.fusion}:{options.probes_per_module}:{options.probe_windows}"
    if memo_key not in pruner.memo:
        estimators = options.parsed()
        scores, cached = cached_batch_scores(pruner.setup, pruner.modules, pruner.linears, estimators)
        sizes = structure_sizes(pruner.modules, pruner.linears)
        names = [e.name for e in estimators]
        importance = normalised(scores, sizes, names)
        rule = FUSIONS[options.fusion]
        x, agreement = FusionInput(importance), None
        if rule.needs_probes:
            probes, deltas, probes_cached = cached_probe_deltas(pruner.setup, pruner.modules, pruner.linears,
                                                               options.probes_per_module, options.probe_windows)
            membership = probe_membership(probes, sizes)
            x = FusionInput(importance, probe_importance(importance, membership), deltas / membership.sum(dim=1))
            cached = cached and probes_cached
            agreement = [spearman(p.mean(dim=0).tolist(), x.oracle.tolist()) for p in x.probe_importance]
        fusion = rule.fn(x)
        offsets, start = {}, 0
        for m in pruner.modules:
            offsets[m.name] = (start, m.n_elements, m.n_kv)
            start += m.n_elements + m.n_kv
        fused = torch.einsum("k,kbn->bn", fusion.weights, importance)
        pruner.memo[memo_key] = Analysis(fused, sizes, offsets, fusion, names, cached, agreement)
    return pruner.memo[memo_key]


def fusion_notes(a: Analysis) -> dict:
    share = a.fusion.weights / a.fusion.weights.sum()
    return {name: {"sigma": float(a.fusion.sigma[i]), "weight": float(a.fusion.weights[i]),
                   "share": float(share[i]), "loss": float(a.fusion.loss[i]),
                   "inconsistency": float(a.fusion.inconsistency[i]),
                   **({"probe_spearman": a.probe_spearman[i]} if a.probe_spearman else {})}
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
