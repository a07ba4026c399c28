"""The goal summary of recovery tables (`metricgp.experiments.recovery_goals`): each row at its last checkpoint,
the best per family against the issue's goal, tables of another protocol left out, bad input one line."""

import json
import math

import pytest

from metricgp.experiments.recovery_goals import BUDGET, heading, main, summarise

DENSE = 30.0
PROTOCOL = {"eval_windows": 8, "seqlen": 512, "dataset": "wikitext2,c4,ptb"}


def table(path, rows, protocol=PROTOCOL):
    path.mkdir(parents=True, exist_ok=True)
    out = {}
    for pipeline, curve, oneshot in rows:
        out[f"{pipeline}|kd|full"] = {
            "pipeline": pipeline, "loss": "kd", "method": "full", "schedule": "cosine", "lr": 3e-4,
            "oneshot": {"wikitext2": oneshot},
            "points": [{"tokens": t, "test": {"wikitext2": v}} for t, v in curve], "final": {}}
    (path / "results.json").write_text(json.dumps({"protocol": protocol, "dense_ppl": {"wikitext2": DENSE},
                                                   "rows": out}))


def test_the_best_row_of_each_family_is_judged_at_its_last_checkpoint(tmp_path):
    # evolved-refit's lowest point (55) is not its last (59): the last one counts, so 59/30 = 1.97x <= 2x
    table(tmp_path / "a", [("evolved-refit", [(16384, 62.0), (32768, 55.0), (65536, 59.0)], 90.0),
                           ("ria-sqrt", [(8192, 48.0), (16384, 45.0)], 70.0)])
    table(tmp_path / "b", [("wanda-refit", [(8192, 70.0)], 97.0), ("sparsegpt-2:4", [(8192, 80.0)], 120.0)])
    table(tmp_path / "c", [("flap", [(8192, 20.0)], 200.0)], protocol={**PROTOCOL, "eval_windows": 4})
    summary = summarise(tmp_path)
    fams = {f["family"]: f for f in summary["families"]}
    s70 = fams["structured 70%"]
    assert s70["best"]["pipeline"] == "evolved-refit" and s70["best"]["perplexity"] == 59.0
    assert s70["met"] and math.isclose(s70["best"]["x_dense"], 59 / 30)
    assert [r["pipeline"] for r in s70["rows"]] == ["evolved-refit", "wanda-refit"]  # flap: other protocol
    assert summary["left_out"] and summary["left_out"][0].startswith("c/results.json")
    u50 = fams["unstructured 50%"]
    assert not u50["met"] and u50["best"]["where"] == "a"
    # 48 -> 45 over the last doubling: 3 per doubling for the 6 doublings from 16K to 1M
    assert math.isclose(u50["heading_at_1M"], 45.0 - 3.0 * math.log2(BUDGET / 16384))
    assert fams["2:4"]["heading_at_1M"] is None  # one checkpoint: no doubling to carry on


def test_heading_needs_a_doubling_between_the_last_two_checkpoints():
    assert heading({"curve": [(0, 90.0), (16384, 60.0), (65536, 50.0)]}) is None
    assert heading({"curve": [(0, 90.0), (32768, 60.0), (65536, 50.0)]}) == 50.0 - 10.0 * 4


def test_the_command_writes_its_files_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    table(tmp_path / "r", [("evolved-refit", [(8192, 70.0), (16384, 66.0)], 90.0)])
    assert main([str(tmp_path)]) == 0
    assert {"goals.md", "goals.json", "goals.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "| structured 70% | 2x (60.00) | evolved-refit, kd, full, cosine | 66.00 | 2.20 |" in (
        tmp_path / "goals.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    assert main([str(tmp_path / "bad")]) == 2
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
    assert not any(p.name.startswith("goals") for p in empty.iterdir())


@pytest.mark.parametrize("missing", ["protocol", "rows"])
def test_a_json_that_is_not_a_recovery_table_is_named_and_skipped(tmp_path, missing):
    table(tmp_path / "r", [("evolved-refit", [(8192, 70.0)], 90.0)])
    other = {"protocol": PROTOCOL, "rows": {}}
    del other[missing]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps(other))
    summary = summarise(tmp_path)
    assert summary["left_out"] == ["x/results.json: not a recovery table"]
