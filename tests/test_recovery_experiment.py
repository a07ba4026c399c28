"""The recovery experiment driver (`python -m metricgp.experiments.recovery`) on the tiny saved Llama: rows,
checkpoints, the lr choice, the tables, and a killed run that resumes to the uninterrupted result."""

from __future__ import annotations

import json
import shlex

import pytest

from metricgp.cli.apply import main as apply_main
from metricgp.experiments import recovery
from metricgp.experiments.recovery import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def base(tiny_llama_dir, text_files, isolated_cache, tmp_path):
    return ["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4", "--seqlen", "32",
            "--dataset", str(text_files["test"]), "--eval-windows", "2", "--max-tokens", "96",
            "--checkpoints", "32,64", "--state-dir", str(tmp_path / "state")]


def _rows(out):
    return json.loads((out / "results.json").read_text())["rows"]


def test_grid_writes_curves_tables_and_reproducing_commands(base, tmp_path, text_files):
    out = tmp_path / "grid"
    assert main([*base, "--pipelines", "ria-sqrt,llm-pruner-taylor", "--losses", "ce,kd", "--lrs", "1e-2",
                 "--out", str(out)]) == 0
    rows = _rows(out)
    assert set(rows) == {f"{p}|{loss}|full" for p in ("ria-sqrt", "llm-pruner-taylor") for loss in ("ce", "kd")}
    test = str(text_files["test"])
    for row in rows.values():
        assert row["done"] and [p["tokens"] for p in row["points"]] == [32, 64, 96] and row["lr"] == 1e-2
        assert all(p["test"][test] > 1 and p["val_ppl"] > 1 for p in row["points"])
        assert row["recovery"]["tokens_per_second"] > 0 and row["recovery"]["split"] == "file"
        assert row["final"][test] == pytest.approx(row["points"][-1]["test"][test], rel=1e-4)
        assert row["points"][-1]["test"][test] != row["oneshot"][test]
    assert rows["ria-sqrt|ce|full"]["size"]["sparsity"] == 0.5
    assert rows["llm-pruner-taylor|kd|full"]["size"]["achieved_keep"] < 0.8
    table = (out / "table.md").read_text()
    assert "| ria-sqrt | kd | full |" in table and "Dense: " in table
    assert (out / "curve.png").stat().st_size > 1000
    # a row's command is an apply command that trains the same way: its report ends where the row ends
    row = rows["ria-sqrt|kd|full"]
    argv = shlex.split(row["command"])[3:]
    argv[argv.index("--out") + 1] = str(tmp_path / "apply")
    assert apply_main([*argv, "--no-save-model"]) == 0
    report = json.loads((tmp_path / "apply" / "report.json").read_text())
    assert report["recovery"]["losses"] == row["recovery"]["losses"]
    assert report["perplexity"]["recovered"] == row["final"]


def test_the_lr_is_chosen_on_validation_text(base, tmp_path):
    out = tmp_path / "choice"
    assert main([*base, "--pipelines", "ria-sqrt", "--losses", "ce", "--lrs", "0,1e-2", "--lr-choice-tokens", "64",
                 "--max-tokens", "32", "--out", str(out)]) == 0
    row = _rows(out)["ria-sqrt|ce|full"]
    tried = row["lr_choice"]
    assert set(tried) == {"0", "0.01"} and tried["0"] != tried["0.01"]
    assert row["lr"] == (0.0 if tried["0"] < tried["0.01"] else 1e-2)


class Killed(Exception):
    pass


def test_a_killed_row_resumes_to_the_uninterrupted_result(base, tmp_path):
    one_row = ["--pipelines", "ria-sqrt", "--losses", "kd", "--lrs", "1e-2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*base, *one_row, "--out", str(whole)]) == 0
    write = recovery.write_table

    def killing(out, meta, rows):
        write(out, meta, rows)
        if any(p["tokens"] == 64 for r in rows.values() for p in r["points"]):
            raise Killed

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        patch.setattr(recovery, "write_table", killing)
        main([*base, *one_row, "--out", str(part)])
    assert not _rows(part)["ria-sqrt|kd|full"].get("done") and list((tmp_path / "state").iterdir())
    assert main([*base, *one_row, "--out", str(part)]) == 0
    untimed = lambda row: [{k: v for k, v in p.items() if k != "train_seconds"} for p in row["points"]]  # noqa: E731
    a, b = _rows(whole)["ria-sqrt|kd|full"], _rows(part)["ria-sqrt|kd|full"]
    assert untimed(a) == untimed(b) and a["final"] == b["final"] and a["recovery"]["losses"] == b["recovery"]["losses"]
    assert b["recovery"]["resumed_from_step"] == 1 and not list((tmp_path / "state").iterdir())
    finished = _rows(part)
    assert main([*base, *one_row, "--out", str(part)]) == 0  # finished: nothing runs again
    assert _rows(part) == finished


def test_a_decaying_schedule_is_its_own_row_and_a_row_continues_only_as_it_began(base, tmp_path, capsys):
    one_row = ["--pipelines", "ria-sqrt", "--losses", "kd", "--lrs", "1e-2", "--max-tokens", "128",
               "--out", str(tmp_path / "out")]
    assert main([*base, *one_row]) == 0
    assert main([*base, *one_row, "--schedule", "cosine"]) == 0  # not the finished constant row again
    rows = _rows(tmp_path / "out")
    constant, cosine = rows["ria-sqrt|kd|full"], rows["ria-sqrt|kd|full|cosine-128"]
    assert cosine["schedule"] == "cosine" and cosine["done"] and cosine["command"].count("--recover-schedule cosine")
    # the same first steps (warmup, then the peak lr), then a lower lr than the constant one
    assert cosine["recovery"]["losses"][:2] == constant["recovery"]["losses"][:2]
    assert cosine["recovery"]["losses"][2:] != constant["recovery"]["losses"][2:]
    assert "| ria-sqrt | kd | full, cosine |" in (tmp_path / "out" / "table.md").read_text()
    capsys.readouterr()
    assert main([*base, *one_row, "--warmup", "0.5"]) == 2
    assert "was trained with --warmup 0.05, not 0.5" in capsys.readouterr().err
    assert _rows(tmp_path / "out") == rows


@pytest.mark.parametrize("extra,message", [
    (["--pipelines", "nope"], "unknown pipelines"),
    (["--losses", "ce,mse"], "unknown recovery loss"),
    (["--lrs", "a"], "comma-separated"),
])
def test_driver_user_errors(base, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main([*base, *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_ranking_section_says_whether_recovery_kept_the_one_shot_order():
    from metricgp.experiments.recovery import ranking_lines

    def row(pipeline: str, loss: str, oneshot: float, recovered: float) -> dict:
        return {"pipeline": pipeline, "loss": loss, "oneshot": {"wikitext2": oneshot},
                "points": [{"tokens": 8192, "test": {"wikitext2": recovered}}]}

    rows = {"a": row("sparsegpt", "kd", 60.0, 50.0), "b": row("ria-sqrt", "kd", 70.0, 45.0),
            "c": row("flap", "kd", 90.0, 80.0), "d": row("evolved-refit", "kd", 91.0, 75.0),
            "e": row("ria-sqrt-2:4", "kd", 200.0, 90.0)}  # alone in its family: no ranking
    lines = [line for line in ranking_lines(rows, "wikitext2") if line.startswith("| structured") or
             line.startswith("| unstructured") or line.startswith("| 2:4")]
    assert lines == [
        "| structured 70% | kd | 8K | flap 90.0 < evolved-refit 91.0 | evolved-refit 75.0 < flap 80.0 | no |",
        "| unstructured 50% | kd | 8K | sparsegpt 60.0 < ria-sqrt 70.0 | ria-sqrt 45.0 < sparsegpt 50.0 | no |"]
    assert ranking_lines({"e": rows["e"]}, "wikitext2") == []  # nothing to rank: no section
