"""`python -m metricgp.compare` on a tiny model: the table, and resuming without recomputation."""

from __future__ import annotations

import json

import pytest

from metricgp.errors import MetricGPError
from metricgp.experiments.compare import main, parse_metric_arg, parse_settings


def test_compare_table_and_resume(tmp_path, tiny_llama_dir, text_files, isolated_cache, monkeypatch):
    test_file = str(text_files["test"])
    args = ["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4",
            "--seqlen", "32", "--dataset", test_file, "--eval-windows", "3", "--settings", "0.5,2:4",
            "--modes", "oneshot", "--metric", "magnitude", "--metric", "mine=abs(W) * sqrt(X)",
            "--out", str(tmp_path / "cmp")]
    assert main(args) == 0
    table = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert len(table["rows"]) == 4
    row = table["rows"]["mul(abs(W), sqrt(X))|2:4|oneshot"]
    assert row["label"] == "mine" and row["sparsity"] == 0.5 and row["perplexity"][test_file] > 1
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert "| mine |" in md and "| dense |" in md and "50% oneshot" in md and "**" in md
    assert (tmp_path / "cmp" / "table.png").stat().st_size > 1000

    # a second run with the same arguments prunes nothing again
    from metricgp.evaluate import PruningSetup

    def refuse(*_a, **_k):
        raise AssertionError("recomputed a finished row")

    monkeypatch.setattr(PruningSetup, "prune", refuse)
    assert main(args) == 0
    again = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert again["rows"] == table["rows"]


def test_metric_and_setting_arguments(tmp_path):
    assert parse_metric_arg("wanda").label == "wanda"
    entry = parse_metric_arg("x=mul(abs(W), X)")
    assert entry.label == "x" and str(entry.tree) == "mul(abs(W), X)"
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"formula": "abs(W)"}))
    assert str(parse_metric_arg(f"ev={best}").tree) == "abs(W)"
    assert parse_settings("0.5, 2:4,0.60") == ["0.5", "2:4", "0.6"]
    with pytest.raises(MetricGPError, match="strictly between"):
        parse_settings("1.5")
    with pytest.raises(MetricGPError, match="bad setting"):
        parse_settings("half")


def test_tables_grow_by_union_and_reuse_rows(tmp_path, tiny_llama_dir, text_files, isolated_cache):
    common = ["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4",
              "--seqlen", "32", "--eval-windows", "2", "--modes", "oneshot", "--metric", "wanda"]
    first = tmp_path / "first"
    assert main([*common, "--settings", "0.5", "--dataset", str(text_files["test"]), "--out", str(first)]) == 0
    # a second table reuses the first one's row and adds a setting and a dataset of its own
    second = tmp_path / "second"
    assert main([*common, "--settings", "0.5,2:4", "--dataset", f"{text_files['test']},{text_files['valid']}",
                 "--reuse", str(first / "table.json"), "--out", str(second)]) == 0
    a = json.loads((first / "table.json").read_text())
    b = json.loads((second / "table.json").read_text())
    key = "mul(abs(W), sqrt(X))|0.5|oneshot"
    test = str(text_files["test"])
    assert b["rows"][key]["perplexity"][test] == a["rows"][key]["perplexity"][test]
    assert set(b["rows"][key]["perplexity"]) == {str(text_files["test"]), str(text_files["valid"])}
    # the same out again with only one setting keeps the union layout in the markdown
    assert main([*common, "--settings", "0.5", "--dataset", str(text_files["test"]), "--out", str(second)]) == 0
    md = (second / "table.md").read_text()
    assert "2:4 oneshot" in md and "50% oneshot" in md and md.count("(test)") == 2
    # a later invocation naming the same formula otherwise: one row per table (two datasets, the legend), both names
    common[-1] = "my-wanda=abs(W) * sqrt(X)"
    assert main([*common, "--settings", "0.5", "--dataset", str(text_files["test"]), "--out", str(second)]) == 0
    md = (second / "table.md").read_text()
    assert md.count("| wanda = my-wanda |") == 3 and "| wanda |" not in md and "| my-wanda |" not in md
    # a table made under other settings is refused
    i = common.index("--eval-windows")
    changed = [*common[: i + 1], "3", *common[i + 2 :]]
    assert main([*changed, "--settings", "0.5", "--dataset", str(text_files["test"]),
                 "--reuse", str(first / "table.json"), "--out", str(tmp_path / "third")]) == 2


def test_run_entries_skip_builtins(tmp_path):
    from metricgp.experiments.compare import run_entries

    entries = [{"rank": 1, "functional": "mul(sqrt(X), abs(W))"},  # wanda, written the other way round
               {"rank": 2, "functional": "mul(abs(W), X)"},
               {"rank": 3, "functional": "abs(W)"},  # magnitude
               {"rank": 4, "functional": "mul(sqr(W), X)"}]
    (tmp_path / "hall_of_fame.json").write_text(json.dumps({"entries": entries}))
    picked = run_entries(tmp_path, top=2)
    assert [e.label for e in picked] == ["evolved #2", "evolved #4"]
    with pytest.raises(MetricGPError, match="hall_of_fame"):
        run_entries(tmp_path / "nope", top=1)
