"""Named structured-pruning methods: the baselines users would pick instead, as presets of the
one evaluator, so every comparison is like for like. `--method NAME` selects one; explicit
options override its fields. Adding a method is one entry.

Gradients: `llm-pruner-taylor` uses the cached G (per-weight l2 norm of the gradient over the
calibration windows) in place of LLM-Pruner's gradient summed over the batch, i.e. |W|*G summed
over the coupled group; both are first-order Taylor estimates of the loss change.

The `evolved*` presets use `metricgp.expr.builtins.EVOLVED` (the default search's best formula) and
`EVOLVED_STRUCTURED`; `--metric`/`--metric-file` replace a preset's metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metricgp.errors import MetricGPError
from metricgp.expr.builtins import EVOLVED, EVOLVED_STRUCTURED


@dataclass(frozen=True)
class Method:
    spec: dict = field(default_factory=dict)  # StructuredSpec fields
    metric: str | None = None  # a built-in name or a formula
    about: str = ""


METHODS: dict[str, Method] = {
    "magnitude-uniform": Method({"reduction": "l2", "allocation": "uniform"}, "magnitude",
                                "Torch-Pruning's LLM default: group L2 magnitude, the same ratio per layer"),
    "llm-pruner-taylor": Method({"reduction": "sum", "allocation": "uniform"}, "taylor",
                                "LLM-Pruner: element-wise first-order Taylor |W*dL/dW| summed over the group"),
    "flap": Method({"importance": "flap", "reduction": "sum", "normalisation": "module-zscore",
                    "allocation": "global", "bias_compensation": True}, None,
                   "FLAP: fluctuation var(x_j)*||W_:,j||^2, standardised per layer, global, bias compensation"),
    "shortgpt": Method({"importance": "shortgpt", "structures": "depth"}, None,
                       "ShortGPT: remove the blocks with the lowest block influence"),
    "saap": Method({"importance": "saap", "allocation": "stability"}, None,
                   "SAAP: Taylor/magnitude/Wanda estimators fused by learned uncertainty, per-layer ratios "
                   "from batch stability (metricgp.structured.saap)"),
    "wanda": Method({}, "wanda", "Wanda's |W|*sqrt(X) with the evaluator's default reduction and allocation"),
    "evolved": Method({}, EVOLVED,
                      "the committed search run's best formula with the evaluator's defaults"),
    "evolved-uniform": Method({"allocation": "uniform"}, EVOLVED,
                              "the evolved formula with the same ratio in every layer (what DarwinLM's search "
                              "is compared with)"),
    "wanda-refit": Method({"refit": True}, "wanda", "wanda with each pruned module's output projection re-fitted "
                          "by least squares on calibration inputs"),
    "evolved-refit": Method({"refit": True}, EVOLVED,
                            "the evolved formula, defaults, with the least-squares refit of output projections"),
    "llm-pruner-taylor-refit": Method({"reduction": "sum", "allocation": "uniform", "refit": True}, "taylor",
                                      "LLM-Pruner's Taylor importance with the least-squares refit"),
    "evolved-structured": Method({}, EVOLVED_STRUCTURED,
                                 "the best formula of a search whose fitness is this evaluator at 70% kept"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MetricGPError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]
