"""The metric search's fitness for structured pruning (`python -m metricgp.search --structured`).

A candidate metric is turned into structure importances exactly as `apply --structured` does
(same reduction, normalisation and allocation), the removed heads and channels are masked (their
output-projection columns zeroed: the same logits as shrinking, without a model copy), and the
pruned model is scored on validation windows like any candidate (`MetricEvaluator.evaluate`).
Scores are reduced over structures and ranked across layers, so only rewrites valid in the
"global" simplification scope may share a fitness.
"""

from __future__ import annotations

from metricgp.errors import MetricGPError
from metricgp.evaluate import EvaluatorSpec, MetricEvaluator, PruningSetup
from metricgp.structured.evaluator import StructuredPruner, StructuredSpec
from metricgp.structured.shrink import mask_plan


class StructuredMetricEvaluator(MetricEvaluator):
    """Model, statistics and validation windows loaded once; many metrics scored structurally."""

    def __init__(self, spec: EvaluatorSpec, structured: StructuredSpec, setup: PruningSetup | None = None):
        if structured.structures != "width" or structured.importance != "metric":
            raise MetricGPError("the structured search scores heads and channels by the candidate metric")
        self._check(spec)
        self.structured = structured.validate()
        self.pattern = None
        self.scope = "global"
        self._load(setup)
        self.pruner = StructuredPruner(self.setup)

    def prune_with(self, tree) -> float:
        removed = self.pruner.plan(self.pruner.score(tree, self.structured), self.structured)
        mask_plan(self.setup.model, self.pruner.modules, removed)
        return sum(u.params for u in removed) / self.pruner.dense_decoder_params
