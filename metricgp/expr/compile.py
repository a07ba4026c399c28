"""Turn a metric tree into a tensor function by nesting closures (no eval, no DEAP compile).

Semantics fixed here:
- leaves read `stats[name]` as float32; constants are float32 0-d tensors;
- whole-tensor operators (mms, zsn, rownorm, colnorm) see their input expanded to W's shape, so a
  metric's value never depends on whether a leaf is stored compactly (X is (1, in));
- the result is float32, on W's device, expanded to W's shape (a view: copy before writing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from metricgp.expr.ops import OPERATORS
from metricgp.expr.printing import to_functional
from metricgp.expr.tree import Node

Stats = Mapping[str, torch.Tensor]
MetricFn = Callable[[Stats], torch.Tensor]


def _build(node: Node) -> MetricFn:
    if node.is_const:
        value = torch.tensor(float(node.value or 0.0), dtype=torch.float32)
        return lambda stats: value
    if node.is_leaf:
        name = node.op
        return lambda stats: stats[name].to(torch.float32)
    op = OPERATORS[node.op]
    fn = op.fn
    kids = [_build(c) for c in node.children]
    if not op.elementwise:
        (kid,) = kids

        def whole(stats: Stats) -> torch.Tensor:
            w = stats["W"]
            return fn(kid(stats).to(w.device).expand(w.shape))

        return whole
    if len(kids) == 1:
        (kid,) = kids
        return lambda stats: fn(kid(stats))
    left, right = kids
    return lambda stats: fn(left(stats), right(stats))


_CACHE: dict[str, MetricFn] = {}
_CACHE_MAX = 8192


def compile_metric(node: Node) -> MetricFn:
    """`stats -> score` for the tree; cached by the tree's functional string."""
    key = to_functional(node)
    fn = _CACHE.get(key)
    if fn is None:
        inner = _build(node)

        def fn(stats: Stats) -> torch.Tensor:
            w = stats["W"]
            return inner(stats).to(device=w.device, dtype=torch.float32).expand(w.shape)

        fn.leaves = node.leaves_used()  # which statistics it reads (sequential mode recomputes only those)
        if len(_CACHE) >= _CACHE_MAX:  # a GP run sees many trees; a crude bound is enough
            _CACHE.clear()
        _CACHE[key] = fn
    return fn
