"""A fitness for metrics that will be used *with* the least-squares refit (apply's reconstruct mode).

After the refit, what matters is not how much a mask removes but how much of the layer's output
the kept weights can still reproduce. For a sample of layers and output rows this evaluator masks
the dense weights with the candidate metric, refits the kept entries of each sampled row exactly
as reconstruct mode does (`metricgp.prune.reconstruct.least_squares_update`, on the dense model's
input Hessian H = XᵀX of the calibration windows), and scores the residual output energy

    e_layer = Σ_rows (w - w')ᵀ H (w - w')  /  Σ_rows wᵀ H w

Fitness = geometric mean of e_layer over the sampled layers (layers differ by orders of magnitude
in e, and a relative change should count the same in each). No forward pass over validation text:
a stage costs a few masked solves. The fidelity is the number of decoder blocks sampled (spread
over depth: first, last, middle, quarters, ...); every linear layer of a sampled block counts.

It approximates reconstruct mode, which refits block by block on inputs from the already-pruned
prefix; `python -m metricgp.bench refit-fidelity` reports how well it ranks metrics against full
reconstruct-mode perplexity (Spearman).
"""

from __future__ import annotations

import math
import time

import torch

from metricgp.evaluate import EvaluatorSpec, FitnessResult, PruningSetup
from metricgp.expr import compile_metric
from metricgp.models import block_linears, find_blocks
from metricgp.prune.engine import DegenerateMetric, layer_scores
from metricgp.prune.patterns import parse_pattern
from metricgp.prune.reconstruct import hessian_hooks, least_squares_update


def spread_order(n: int) -> list[int]:
    """0..n-1 ordered so that every prefix is spread over the range: first, last, middle, quarters ..."""
    if n <= 0:
        return []
    order, seen = [], set()
    parts = 1
    while len(order) < n:
        for j in range(parts + 1):
            i = round(j * (n - 1) / parts)
            if i not in seen:
                seen.add(i)
                order.append(i)
        parts *= 2
    return order


class RefitResidualEvaluator:
    """The `MetricEvaluator` protocol with the refit residual as fitness (see the module doc)."""

    def __init__(self, spec: EvaluatorSpec, rows_per_layer: int = 32, setup: PruningSetup | None = None):
        self.spec = spec
        self.pattern = parse_pattern(spec.pattern, spec.sparsity)
        self.scope = self.pattern.simplify_scope  # masks of one tensor: the unstructured search's scope
        self.setup = setup or PruningSetup.from_spec(spec)
        prefix, blocks = find_blocks(self.setup.model)
        self.order = spread_order(len(blocks))
        self.fidelities = tuple(min(f, len(blocks)) for f in spec.fidelities)
        gen = torch.Generator().manual_seed(spec.seed)
        self.layers: list[list[tuple[str, torch.Tensor]]] = []  # per sampled block: (layer name, rows)
        for b in self.order[: max(self.fidelities)]:
            rows = []
            for rel, lin in block_linears(blocks[b]).items():
                pick = torch.randperm(lin.out_features, generator=gen)[: min(rows_per_layer, lin.out_features)]
                rows.append((f"{prefix}.{b}.{rel}", pick.sort().values))
            self.layers.append(rows)
        self.hessians = self._hessians([name for block in self.layers for name, _ in block])

    def _hessians(self, names: list[str]) -> dict[str, torch.Tensor]:
        """H = XᵀX / tokens of each named layer on the calibration windows of the dense model."""
        layers = {n: self.setup.layers[n] for n in names}
        sums: dict[str, torch.Tensor] = {}
        device = next(self.setup.model.parameters()).device
        with torch.no_grad(), hessian_hooks(layers, sums):
            for window in self.setup.calib:
                self.setup.model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
        tokens = self.setup.calib.numel()
        return {n: (h / tokens).to(layers[n].weight.device) for n, h in sums.items()}

    def layer_residual(self, metric, name: str, rows: torch.Tensor) -> float:
        """e_layer of one layer for a compiled metric (raises DegenerateMetric like pruning does)."""
        w = self.setup.dense.weights[name].float()
        keep = self.pattern.mask(layer_scores(metric, w, self.setup.stats[name], name))[rows]
        h = self.hessians[name]
        dense_rows = w[rows]
        refit = least_squares_update(dense_rows, keep, h)
        diff = dense_rows - refit
        energy = float(((dense_rows @ h) * dense_rows).sum())
        residual = float(((diff @ h) * diff).sum())
        return max(residual, 0.0) / max(energy, 1e-30)

    def evaluate(self, tree, n_blocks: int) -> FitnessResult:
        t0 = time.perf_counter()
        metric = compile_metric(tree)
        logs = []
        try:
            for block in self.layers[:n_blocks]:
                for name, rows in block:
                    logs.append(math.log(max(self.layer_residual(metric, name, rows), 1e-12)))
        except DegenerateMetric as err:
            return FitnessResult(math.inf, n_blocks, str(err), time.perf_counter() - t0, 0.0)
        value = math.exp(sum(logs) / len(logs))
        ok = math.isfinite(value)
        return FitnessResult(value if ok else math.inf, n_blocks, None if ok else "non-finite fitness",
                             time.perf_counter() - t0, self.pattern.sparsity)
