"""Published pruning metrics as formulas, and `resolve_metric` (a built-in name, a formula or a file).

X is the mean squared input activation per feature, so sqrt(X) is Wanda's ||X_j||_2 up to the
constant sqrt(#tokens), which no per-row or N:M ranking can see.
"""

from __future__ import annotations

import json
from pathlib import Path

from metricgp.errors import MetricGPError
from metricgp.expr.parse import FormulaError, parse
from metricgp.expr.tree import Node

BUILTIN_METRICS: dict[str, str] = {
    # Han et al. 2015: weight magnitude.
    "magnitude": "abs(W)",
    # Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2.
    "wanda": "mul(abs(W), sqrt(X))",
    # GBLM-Pruner (Das et al. 2023): |W| * (||X_j||_2 + alpha * ||G_ij||_2). alpha = 100 is the
    # `scale` default of the authors' released pruner; the relative weight of the two terms also
    # depends on how X and G are normalised, so treat it as a reasonable, not a tuned, value.
    "gblm": "mul(abs(W), add(sqrt(X), mul(100.0, G)))",
    # RIA (Zhang et al. 2024): (|W_ij| / sum_row |W| + |W_ij| / sum_col |W|) * ||X_j||_2^0.5.
    "ria": "mul(add(rownorm(abs(W)), colnorm(abs(W))), sqrt(sqrt(X)))",
    # Pruner-Zero (Dong et al. 2024): the searched metric as released.
    "pruner-zero": "mul(abs(mul(W, W)), mms(G))",
    # SparseGPT (Frantar & Alistarh 2023): the OBS saliency w^2 / [H^-1]_jj as a one-shot mask. SparseGPT
    # itself also picks masks block by block while it updates the kept weights; that update is the
    # reconstruct mode's job here (`--mode reconstruct`).
    "sparsegpt": "div(sqr(W), Hinv)",
}
# Names that are not baselines of their own (not in BUILTIN_METRICS, which compare tabulates):
# first-order Taylor |W * dL/dW| (LLM-Pruner), with G the per-weight gradient l2 norm over the windows.
ALIASES: dict[str, str] = {"taylor": "mul(abs(W), G)"}

# The default metric search's best formula (run smollm2-default-s0 of this project, generation 24): the
# "evolved" presets' metric unless --metric/--metric-file gives another. It is GBLM's form, found again.
EVOLVED = "mul(abs(W), add(sqrt(X), mul(100.0, G)))"
# The best formula of the structured search at 70% kept (structured-search-k70): first-order Taylor.
EVOLVED_STRUCTURED = ALIASES["taylor"]


def formula_from_file(path) -> str:
    """The 'formula' string of a JSON file (a search's best.json), or a one-line MetricGPError."""
    path = Path(path)
    if not path.is_file():
        raise MetricGPError(f"metric file not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetricGPError(f"metric file {path} is not valid JSON: {err}") from None
    formula = payload.get("formula") if isinstance(payload, dict) else None
    if not isinstance(formula, str):
        raise MetricGPError(f"metric file {path} has no string 'formula' key")
    return formula


def resolve_metric(text) -> Node:
    """The one way to name a metric: a built-in name (case-insensitive, '_' or '-'), a formula, or a
    JSON file with a 'formula' key (a path ending in .json: a search's best.json), as a tree."""
    if isinstance(text, Path) or (isinstance(text, str) and text.strip().lower().endswith(".json")):
        return parse(formula_from_file(text))
    if not isinstance(text, str) or not text.strip():
        raise FormulaError(f"empty metric; give a formula or one of: {', '.join(BUILTIN_METRICS)}")
    name = text.strip().lower().replace("_", "-")
    if name in BUILTIN_METRICS or name in ALIASES:
        return parse({**BUILTIN_METRICS, **ALIASES}[name])
    return parse(text)
