"""What we write is strict JSON (no Infinity/NaN), summaries state the settings that were used, and
search spaces cite only what exists."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from metricgp.experiments.compare import Entry, markdown
from metricgp.expr import parse
from metricgp.provenance import write_json_atomic
from metricgp.search.artifacts import append_log, read_log, write_summary

ROOT = Path(__file__).resolve().parents[1]


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def strict_loads(text: str):
    return json.loads(text, parse_constant=_refuse)


def test_write_json_atomic_writes_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"inf": math.inf, "rows": [math.nan, 1.5, -math.inf], "nested": {2: (1, math.inf)}})
    assert strict_loads(path.read_text()) == {"inf": None, "rows": [None, 1.5, None], "nested": {"2": [1, None]}}


def test_the_search_log_is_strict_json_too(tmp_path):
    append_log(tmp_path, {"gen": 0, "best_fitness": math.inf, "median": math.nan})
    line = (tmp_path / "log.jsonl").read_text().splitlines()[0]
    assert strict_loads(line) == {"gen": 0, "best_fitness": None, "median": None}
    assert read_log(tmp_path) == [{"gen": 0, "best_fitness": None, "median": None}]


def test_a_comparison_table_with_an_infinite_perplexity(tmp_path):
    tree = parse("abs(W)")
    table = {"context": {"model": "m", "fingerprint": "f", "dtype": "auto", "calib": "c4", "n_calib": 2,
                         "seqlen": 16, "seed": 0, "eval_windows": 2},
             "provenance": {"git": "g", "command": "python -m metricgp.compare"},
             "dense": {"d": 10.0},
             "rows": {"abs(W)|0.5|oneshot": {"label": "magnitude", "formula": "abs(W)", "setting": "0.5",
                                             "mode": "oneshot", "sparsity": 0.5, "perplexity": {"d": math.inf}}}}
    path = tmp_path / "table.json"
    write_json_atomic(path, table)
    reread = strict_loads(path.read_text())
    assert reread["rows"]["abs(W)|0.5|oneshot"]["perplexity"] == {"d": None}  # measured, not finite
    md = markdown(reread, [Entry("magnitude", tree)], ["0.5"], ["oneshot"], ["d"])
    assert "| magnitude | **inf** |" in md and "| dense | 10.00 |" in md


def _summary(tmp_path: Path, seqlen: int | None) -> str:
    spec = {"model": "m", "calib": "c4", "n_calib": 8, "valid": "wikitext2", "pattern": "2:4", "sparsity": 0.5,
            "fitness": "ppl", "seed": 3}
    if seqlen is not None:
        spec["seqlen"] = seqlen
    config = {"config": {"space": {"source": "search_spaces/x.yaml"}, "evaluator": "model", "evaluator_spec": spec},
              "seed": 1, "fidelities": [1, 4], "command": "python -m metricgp.search", "git": "abc"}
    write_json_atomic(tmp_path / "config.json", config)
    write_summary(tmp_path, "run", [], [], {}, "done")
    return (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("seqlen", [128, 2048])
def test_the_run_summary_states_the_real_window_length(tmp_path, seqlen):
    text = _summary(tmp_path, seqlen)
    assert f"first N {seqlen}-token windows" in text and "512-token" not in text
    assert "(2:4, sparsity 0.5)" in text and "calibration seed 3" in text and "GP seed 1" in text


def test_the_run_summary_default_window_length_is_the_evaluators(tmp_path):
    from metricgp.evaluate import EvaluatorSpec

    assert f"first N {EvaluatorSpec().seqlen}-token windows" in _summary(tmp_path, None)


def test_search_spaces_cite_only_files_that_exist():
    """Comments may cite URLs, or files of this repository; a file named there must be here."""
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        for line in path.read_text(encoding="utf-8").splitlines():
            comment = line.partition("#")[2]
            comment = re.sub(r"https?://\S+", "", comment)
            for cited in re.findall(r"[\w./-]+\.(?:md|py|ya?ml|json|txt)\b", comment):
                assert (ROOT / cited).exists(), f"{path.name} cites {cited}, which is not in the repository"
