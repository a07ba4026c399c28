"""How many units each module loses: uniform, global, or an explicit per-module keep map.

The target is a number of decoder parameters to keep. `uniform` and `global` remove units while
the kept count stays at or above the target, skipping a unit that would undershoot, so they end
within one unit of it. Every module keeps at least one unit (a layer with no heads or channels
is a different operation: block removal). A keep map is what the DarwinLM search drives: each
named module keeps that fraction of its units, by importance; unnamed modules are untouched.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

from metricgp.errors import MetricGPError
from metricgp.structured.importance import Unit, by_module


def _global(units: list[Unit], budget: int) -> list[Unit]:
    """Least important first across all modules; `budget` parameters may be removed."""
    left = {m: len(us) - 1 for m, us in by_module(units, least_important_first=True).items()}
    removed: list[Unit] = []
    for u in sorted(units, key=lambda u: (u.norm, u.module, u.members)):
        if left[u.module] > 0 and u.params <= budget:
            removed.append(u)
            budget -= u.params
            left[u.module] -= 1
    return removed


def _uniform(units: list[Unit], budget: int) -> list[Unit]:
    """Water-filling: always take the next unit of the module with the smallest removed fraction."""
    queues = by_module(units, least_important_first=True)
    size = {m: sum(u.params for u in us) for m, us in queues.items()}
    taken = dict.fromkeys(queues, 0)
    removed_params = dict.fromkeys(queues, 0)
    heap = [((us[0].params) / size[m], m) for m, us in queues.items() if len(us) > 1]
    heapq.heapify(heap)
    removed: list[Unit] = []
    while heap:
        _, m = heapq.heappop(heap)
        u = queues[m][taken[m]]
        if u.params > budget:
            continue  # this module's units no longer fit; smaller ones elsewhere may
        removed.append(u)
        budget -= u.params
        taken[m] += 1
        removed_params[m] += u.params
        if taken[m] < len(queues[m]) - 1:
            heapq.heappush(heap, ((removed_params[m] + queues[m][taken[m]].params) / size[m], m))
    return removed


ALLOCATIONS: dict[str, Callable[[list[Unit], int], list[Unit]]] = {
    "uniform": _uniform,  # the same fraction of every module (Torch-Pruning, LLM-Pruner style)
    "global": _global,  # one ranking across all modules and kinds (FLAP style)
}


def allocate(units: list[Unit], budget: int, allocation: str = "global") -> list[Unit]:
    """Units to remove so that at most `budget` parameters go (within one unit of it)."""
    if allocation not in ALLOCATIONS:
        raise MetricGPError(f"unknown allocation '{allocation}' (choose from {', '.join(ALLOCATIONS)}, "
                            "or give a keep map)")
    return ALLOCATIONS[allocation](units, budget)


def from_keep_map(units: list[Unit], keep: Mapping[str, float]) -> list[Unit]:
    """Each named module keeps round(fraction x its units), at least one; the least important go."""
    queues = by_module(units, least_important_first=True)
    unknown = sorted(set(keep) - set(queues))
    if unknown:
        sample = ", ".join(list(queues)[:4])
        raise MetricGPError(f"keep map names unknown module(s) {', '.join(unknown)} (modules look like: {sample} ...)")
    removed: list[Unit] = []
    for m, fraction in keep.items():
        if not 0.0 <= float(fraction) <= 1.0:
            raise MetricGPError(f"keep map: fraction for {m} must be in [0, 1], got {fraction}")
        n_keep = max(1, round(float(fraction) * len(queues[m])))
        removed.extend(queues[m][: len(queues[m]) - n_keep])
    return removed
