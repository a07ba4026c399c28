"""The metric search's fitness for structured pruning (`python -m metricgp.search --structured`).

A candidate metric is turned into structure importances exactly as `apply --structured` does
(same reduction, normalisation and allocation), the removed heads and channels are masked (their
output-projection columns zeroed: the same logits as shrinking, without a model copy), and the
pruned model is scored on validation windows. Scores are reduced over structures and ranked
across layers, so only rewrites valid in the "global" simplification scope may share a fitness.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

from metricgp.errors import MetricGPError
from metricgp.evaluate import FITNESSES, EvaluatorSpec, FitnessResult, PruningSetup
from metricgp.structured.evaluator import StructuredPruner, StructuredSpec
from metricgp.structured.shrink import mask_plan


class StructuredMetricEvaluator:
    """Model, statistics and validation windows loaded once; many metrics scored structurally."""

    scope = "global"

    def __init__(self, spec: EvaluatorSpec, structured: StructuredSpec, setup: PruningSetup | None = None):
        if structured.structures != "width" or structured.importance != "metric":
            raise MetricGPError("the structured search scores heads and channels by the candidate metric")
        if spec.fitness not in FITNESSES:
            raise MetricGPError(f"unknown fitness '{spec.fitness}' (choose from {', '.join(FITNESSES)})")
        self.spec = spec
        self.structured = structured.validate()
        self.objective = FITNESSES[spec.fitness]
        self.setup = setup or PruningSetup.from_spec(spec)
        self.pruner = StructuredPruner(self.setup)
        self.valid = self.setup.fitness_windows(max(spec.fidelities))
        self.fidelities = tuple(min(f, len(self.valid)) for f in spec.fidelities)
        build = self.objective.reference
        self.reference = build(self.setup.model, self.valid) if build is not None else None
        self.timings: dict[str, float] = defaultdict(float)

    def evaluate(self, tree, n_windows: int) -> FitnessResult:
        from metricgp.prune.engine import DegenerateMetric

        t0 = time.perf_counter()
        windows = self.valid[:n_windows]
        try:
            removed = self.pruner.plan(self.pruner.score(tree, self.structured), self.structured)
        except DegenerateMetric as err:
            return FitnessResult(math.inf, len(windows), str(err), time.perf_counter() - t0, 0.0)
        mask_plan(self.setup.model, self.pruner.modules, removed)
        t1 = time.perf_counter()
        self.timings["score_mask"] += t1 - t0
        try:
            value = self.objective.measure(self.setup.model, windows, self.reference, self.spec.batch_size)
        finally:
            self.setup.dense.restore()
        self.timings["forward"] += time.perf_counter() - t1
        kept = 1 - sum(u.params for u in removed) / self.pruner.dense_decoder_params
        reason = None if math.isfinite(value) else "non-finite fitness"
        return FitnessResult(value if math.isfinite(value) else math.inf, len(windows), reason,
                             time.perf_counter() - t0, 1 - kept)
