"""`make bench-distributed`'s arithmetic: the throughput model and the summary of a run's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from metricgp.experiments.distributed import Cost, model_rows, summarize
from metricgp.search.run import RunConfig, start
from metricgp.search.space import load_space, with_overrides

TINY = Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml"


def test_the_model_charges_every_stage_its_rounds_and_only_async_removes_the_barrier():
    cost = Cost(per_candidate=1.0, per_window=0.5, jitter=0.0)
    rows = {r["workers"]: r for r in model_rows((1, 4, 16), offspring=8, eta=3, cost=cost, workers=(1, 2, 8))}
    # stage jobs 8, 3, 1 costing 1.5, 2.5 and 7 s: 12 + 7.5 + 7 = 26.5 s of work per generation
    assert rows[1]["sync_evaluations_per_hour"] == pytest.approx(3600 * 12 / 26.5, abs=0.1)
    assert rows[1]["sync_idle_share"] == 0.0 and rows[1]["async_idle_share"] == 0.0
    # two workers: 4 + 2 + 1 rounds = 6 + 5 + 7 = 18 s; async: 26.5 / 2 = 13.25 s
    assert rows[2]["sync_evaluations_per_hour"] == pytest.approx(3600 * 12 / 18, abs=0.1)
    assert rows[2]["async_evaluations_per_hour"] == pytest.approx(3600 * 12 / 13.25, abs=0.1)
    # eight workers: the synchronous generation is one round per stage; async waits for nothing
    assert rows[8]["sync_evaluations_per_hour"] == pytest.approx(3600 * 12 / 11, abs=0.1)
    assert rows[8]["async_evaluations_per_hour"] == pytest.approx(3600 * 12 / (26.5 / 8), abs=0.1)
    driven = {r["workers"]: r for r in model_rows((1, 4, 16), offspring=8, eta=3, cost=cost, workers=(1, 64),
                                                  driver=3.5)}
    assert driven[1]["sync_evaluations_per_hour"] == pytest.approx(3600 * 12 / 30, abs=0.1)
    assert driven[64]["async_evaluations_per_hour"] == pytest.approx(3600 * 12 / 3.5, abs=0.1)  # driver-bound


def test_summary_of_a_serial_run(tmp_path):
    space = with_overrides(load_space(TINY), gp={"generations": 3, "seed": 1})
    start(RunConfig(space=space, evaluator="synthetic", evaluator_spec={"delay_per_window": 0.001}), tmp_path)
    row = summarize(tmp_path, workers=1)
    assert row["generations"] == 3 and row["evaluations"] > 0 and row["windows_run"] > 0
    assert 0.0 <= row["worker_idle_share"] < 1.0 and row["driver_seconds_per_generation"] >= 0.0
    assert len(row["idle_share_per_generation"]) == 3
