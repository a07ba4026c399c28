"""Structure importance in three steps (Torch-Pruning's shape): score every coupled weight with a
metric, reduce over each unit's coupled weights, normalise so units of different layers and kinds
compare.

Element scores come from the same compiled closures the metric search uses, over the same cached
W/X/G statistics. A *reduction* pools the scores of a unit's weights (`REDUCTIONS`); a
*normalisation* makes units comparable across modules (`NORMALISATIONS`). Each is one entry in a
dict, so adding one is one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.prune.engine import layer_scores
from metricgp.structured.groups import HEAD_MODES, Module, Slice


@dataclass(frozen=True)
class Reduction:
    """Pool element scores: `final(pool(elem(s)), count)`; pool is a sum or a max."""

    elem: Callable[[torch.Tensor], torch.Tensor]
    use_max: bool
    final: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


REDUCTIONS: dict[str, Reduction] = {
    "sum": Reduction(lambda s: s, False, lambda v, n: v),
    "mean": Reduction(lambda s: s, False, lambda v, n: v / n),
    "l2": Reduction(torch.square, False, lambda v, n: v.clamp_min(0).sqrt()),
    "max": Reduction(lambda s: s, True, lambda v, n: v),
}


@dataclass
class Partial:
    """Pooled (not yet finalised) scores of a module's elements and KV heads, with weight counts."""

    value: torch.Tensor  # (n_elements,)
    count: torch.Tensor
    kv_value: torch.Tensor  # (n_kv,) — empty for MLPs and multi-head attention
    kv_count: torch.Tensor


def _pool(x: torch.Tensor, dims: tuple[int, ...], use_max: bool) -> torch.Tensor:
    return x.amax(dim=dims) if use_max else x.sum(dim=dims, dtype=torch.float64)


def _slice_partial(scores: torch.Tensor, s: Slice, n: int, red: Reduction) -> tuple[torch.Tensor, int]:
    e = red.elem(scores)
    if s.axis == 0:
        return _pool(e.reshape(n, s.size, e.shape[1]), (1, 2), red.use_max), s.size * e.shape[1]
    return _pool(e.reshape(e.shape[0], n, s.size), (0, 2), red.use_max), s.size * e.shape[0]


def _combine(parts: list[tuple[torch.Tensor, int]], n: int, red: Reduction) -> tuple[torch.Tensor, torch.Tensor]:
    if not parts:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    values = torch.stack([p.double() for p, _ in parts])
    value = values.amax(0) if red.use_max else values.sum(0)
    return value, torch.full((n,), float(sum(c for _, c in parts)), dtype=torch.float64, device=value.device)


def module_partial(module: Module, scores: Mapping[str, torch.Tensor], red: Reduction) -> Partial:
    """Pooled scores per element (query head / channel) and per KV head of one module."""
    elem = [_slice_partial(scores[s.linear], s, module.n_elements, red) for s in module.slices]
    kv = [_slice_partial(scores[s.linear], s, module.n_kv, red) for s in module.kv_slices]
    value, count = _combine(elem, module.n_elements, red)
    kv_value, kv_count = _combine(kv, module.n_kv, red)
    return Partial(value, count, kv_value, kv_count)


@dataclass(frozen=True)
class Unit:
    """The smallest removable piece: query heads/channels `members` (+ KV heads `kv`) of `module`."""

    module: str
    kind: str  # "head" | "channel"
    members: tuple[int, ...]
    kv: tuple[int, ...]
    params: int
    score: float  # reduced (raw) importance
    norm: float = 0.0  # normalised importance: what allocations compare


def by_module(units: list[Unit], least_important_first: bool = False) -> dict[str, list[Unit]]:
    """The units of each module, in the given order or least important first (ties by position, so
    the order is deterministic)."""
    out: dict[str, list[Unit]] = {}
    for u in units:
        out.setdefault(u.module, []).append(u)
    if least_important_first:
        return {m: sorted(us, key=lambda u: (u.norm, u.members)) for m, us in out.items()}
    return out


def module_units(module: Module, part: Partial, linears: dict[str, nn.Linear], red: Reduction,
                 head_mode: str = "per-group") -> list[Unit]:
    """The removable units of one module with their reduced importance. Every unit's score is computed
    on the scores' device at once and read back in one transfer (one sync per module, not per unit)."""
    if head_mode not in HEAD_MODES:
        raise MetricGPError(f"unknown head mode '{head_mode}' (choose from {', '.join(HEAD_MODES)})")
    per = module.element_params(linears)
    kind = "head" if module.kind == "attention" else "channel"
    if module.kind == "mlp" or module.group_size == 1 and not module.kv_slices:
        scores = red.final(part.value, part.count).tolist()
        return [Unit(module.name, kind, (i,), (), per, scores[i]) for i in range(module.n_elements)]
    g = module.group_size
    if head_mode == "kv-group":  # unit k: the g query heads of KV group k and the KV head itself
        value = torch.cat([part.value.view(module.n_kv, g), part.kv_value.view(module.n_kv, 1)], dim=1)
        count = torch.cat([part.count.view(module.n_kv, g), part.kv_count.view(module.n_kv, 1)], dim=1)
        pooled = value.amax(1) if red.use_max else value.sum(1)
        scores = red.final(pooled, count.sum(1)).tolist()
        params = per * g + module.kv_params(linears)
        return [Unit(module.name, kind, tuple(range(k * g, (k + 1) * g)), (k,), params, scores[k])
                for k in range(module.n_kv)]
    # per-group: unit r takes the r-th least important query head of every KV group
    order = red.final(part.value, part.count).view(module.n_kv, g).argsort(dim=1, stable=True)
    heads = order + torch.arange(module.n_kv, device=order.device).unsqueeze(1) * g  # (n_kv, g) head indices
    value, count = part.value[heads], part.count[heads]
    pooled = value.amax(0) if red.use_max else value.sum(0)
    scores = red.final(pooled, count.sum(0)).tolist()
    members = heads.t().tolist()
    return [Unit(module.name, kind, tuple(members[r]), (), per * module.n_kv, scores[r]) for r in range(g)]


def _per_module(units: list[Unit], fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[Unit]:
    by_module: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        by_module.setdefault(u.module, []).append(i)
    out = list(units)
    for idx in by_module.values():
        s = torch.tensor([units[i].score for i in idx], dtype=torch.float64)
        p = torch.tensor([units[i].params for i in idx], dtype=torch.float64)
        for i, v in zip(idx, fn(s, p).tolist(), strict=True):
            out[i] = replace(units[i], norm=float(v))
    return out


def _zscore(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    std = s.std() if len(s) > 1 else torch.tensor(0.0, dtype=s.dtype)
    return (s - s.mean()) / std if std > 0 else s - s.mean()


def _module_mean(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    mean = s.abs().mean()
    return s / mean if mean > 0 else s


# name -> fn(scores, params) applied to the units of each module separately
NORMALISATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "none": lambda s, p: s,
    "per-param": lambda s, p: s / p,  # importance per parameter removed
    "module-mean": _module_mean,  # relative to the module's mean unit
    "module-zscore": _zscore,  # FLAP's standardisation per layer
}


def normalise(units: list[Unit], name: str) -> list[Unit]:
    if name not in NORMALISATIONS:
        raise MetricGPError(f"unknown normalisation '{name}' (choose from {', '.join(NORMALISATIONS)})")
    return _per_module(units, NORMALISATIONS[name])


def element_scores(metric, linears: dict[str, nn.Linear], stats: Mapping[str, Mapping[str, torch.Tensor]],
                   names: set[str]) -> dict[str, torch.Tensor]:
    """The metric's score of every weight of the named linears (float32, shape of the weight)."""

    return {n: layer_scores(metric, linears[n].weight.detach(), stats.get(n, {}), n) for n in names}


def score_units(modules: list[Module], linears: dict[str, nn.Linear], scores: Mapping[str, torch.Tensor],
                reduction: str = "sum", normalisation: str = "per-param", head_mode: str = "per-group") -> list[Unit]:
    """Units of every module, reduced and normalised."""
    return score_units_by_module(modules, linears, lambda names: scores, reduction, normalisation, head_mode)


def score_units_by_module(modules: list[Module], linears: dict[str, nn.Linear],
                          scores_of: Callable[[set[str]], Mapping[str, torch.Tensor]], reduction: str = "sum",
                          normalisation: str = "per-param", head_mode: str = "per-group") -> list[Unit]:
    """`score_units` with the element scores asked for one module's linears at a time (`scores_of(names)`)
    and reduced before the next module's are made: float32 scores of every weight of the model (twice a
    bfloat16 model's bytes) never exist at once."""
    if reduction not in REDUCTIONS:
        raise MetricGPError(f"unknown reduction '{reduction}' (choose from {', '.join(REDUCTIONS)})")
    red = REDUCTIONS[reduction]
    units = []
    for m in modules:
        scores = scores_of({s.linear for s in m.slices + m.kv_slices})
        units += module_units(m, module_partial(m, scores, red), linears, red, head_mode)
    return normalise(units, normalisation)
