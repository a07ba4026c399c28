"""`python -m metricgp.darwin.compare` on run directories with known trajectories."""

from __future__ import annotations

import json

import pytest

from metricgp.experiments.darwin import main

STAGES = [{"survivors": 4, "windows": 2, "train_tokens": 0}, {"survivors": 1, "windows": 8, "train_tokens": 0}]
TRAINED = [{**STAGES[0], "train_tokens": 2048}, {**STAGES[1], "train_tokens": 4096}]


def fake_run(path, prior, fitness, seconds, genome, stages=STAGES, ppl=None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"config": {"prior": prior, "stages": stages}}))
    records = [{"gen": g, "fitness": f, "seconds": s, "genome": genome} for g, (f, s) in enumerate(
        zip(fitness, seconds, strict=True))]
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if ppl is not None:
        (path / "report.json").write_text(json.dumps({"genome": genome, "perplexity": ppl,
                                                      "spearman_predicted_vs_first_stage_all": 0.5}))
    return path


def test_time_to_fitness_winner_distance_and_report(tmp_path, capsys):
    prior = fake_run(tmp_path / "prior", True, [2.0, 1.5, 1.2, 1.2], [10, 20, 20, 20], [1, 2, 3],
                     ppl={"dense": {"wikitext2": 30.0}, "pruned": {"wikitext2": 90.0}})
    plain = fake_run(tmp_path / "plain", False, [4.0, 3.0, 1.4, 1.3], [10, 10, 10, 10], [1, 0, 5],
                     ppl={"pruned": {"wikitext2": 99.0}})
    trained = fake_run(tmp_path / "trained", True, [1.0, 0.9], [30, 60], [2, 2, 2], stages=TRAINED)
    out = tmp_path / "cmp"
    assert main([str(prior), str(plain), str(trained), "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    reach = {row["target_of"]: row for row in result["time_to_fitness"]}
    # the plain run's final 1.3: the prior run got there at generation 2 after 50 s
    assert reach["plain"]["reached"]["prior"] == {"generation": 2, "seconds": 50.0}
    assert reach["plain"]["reached"]["plain"] == {"generation": 3, "seconds": 40.0}
    assert reach["prior"]["reached"]["plain"] is None  # never at 1.2
    assert set(reach["trained"]["reached"]) == {"trained"}  # trained fitness is not comparable
    assert result["winner_distances"]["prior vs plain"] == {"genes_differ": 2, "level_distance": 4}
    text = (out / "compare.md").read_text()
    assert "| prior | pruned | 90.00 |" in text and "not reached" in text and "other schedule" in text
    assert (out / "fitness-vs-time.png").stat().st_size > 1000
    (versus,) = result["against_first_run"]  # trained has no report: nothing to set against prior's
    assert versus["run"] == "plain" and versus["lower"] == 0
    assert versus["delta_percent"]["wikitext2"] == pytest.approx(10.0)
    assert "- plain pruned: wikitext2 +10.0%; lower on 0 of 1" in text


def test_not_a_run_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a level-search run" in err and len(err.splitlines()) == 1
