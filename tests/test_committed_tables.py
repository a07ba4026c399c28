"""Each experiment driver remakes its committed table from its committed JSON, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metricgp.experiments import compare, noise, report, saap, seeds

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _json(name: str) -> dict:
    path = RESULTS / name
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    return json.loads(path.read_text(encoding="utf-8"))


def test_structured_table(tmp_path):
    report.write_table(tmp_path, _json("structured/table.json"))
    assert (tmp_path / "table.md").read_text() == (RESULTS / "structured/table.md").read_text()


def test_saap_ablation(tmp_path):
    saap.write_report(tmp_path, _json("structured/saap.json"))
    assert (tmp_path / "saap.md").read_text() == (RESULTS / "structured/saap.md").read_text()


def test_structured_seeds():
    assert seeds.markdown(_json("structured-seeds/seeds.json")) == (RESULTS / "structured-seeds/seeds.md").read_text()


def test_noise_floor():
    table = _json("noise-floor/table.json")
    assert noise.markdown(table, table["noise"]) == (RESULTS / "noise-floor/table.md").read_text()


def test_baselines():
    table = _json("baselines/table.json")
    entries = [compare.Entry(label, compare.resolve_metric(d["functional"])) for label, d in table["metrics"].items()]
    layout = table["layout"]
    text = compare.markdown(table, compare.one_row_per_formula(entries), layout["settings"], layout["modes"],
                            layout["datasets"])
    assert text == (RESULTS / "baselines/table.md").read_text()
