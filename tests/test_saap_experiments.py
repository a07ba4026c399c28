"""`python -m metricgp.structured.experiments saap` end to end on a tiny random Llama: every ablation
row, the sigma record, resuming without recomputation, and user errors. Tiny models only."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
from conftest import train_tokenizer
from structured_models import family_model

from metricgp.experiments import saap as saap_experiments
from metricgp.experiments.structured import main

ESTIMATORS = ["taylor-element", "taylor-vector", "magnitude", "wanda"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, text_files):
    """One full run: four blocks (so skip_edge_blocks leaves two), five estimators (the fifth a best.json)."""
    root = tmp_path_factory.mktemp("saap-ablation")
    tokenizer = train_tokenizer(text_files["calib"].read_text())
    model = family_model("llama", vocab=len(tokenizer), layers=4)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    best = root / "best.json"
    best.write_text(json.dumps({"formula": "mul(abs(W), add(sqrt(X), mul(100.0, G)))"}))
    estimators = [*ESTIMATORS, str(best)]
    datasets = [str(text_files["test"]), str(text_files["valid"])]
    args = ["saap", "--model", str(root / "model"), "--calib", str(text_files["calib"]), "--n-calib", "4",
            "--seqlen", "32", "--dataset", ",".join(datasets), "--eval-windows", "2", "--recover-tokens", "64",
            "--estimators", ",".join(estimators), "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METRICGP_CACHE", str(root / "cache"))
        assert main([*args, "--out", str(root / "out")]) == 0
        table = json.loads((root / "out" / "saap.json").read_text())
        yield SimpleNamespace(args=args, root=root, out=root / "out", table=table, model=model,
                              estimators=estimators, datasets=datasets)


def _finite(ppl: dict, datasets: list[str]) -> bool:
    return set(ppl) == set(datasets) and all(v is not None and math.isfinite(v) and v > 1 for v in ppl.values())


def test_every_row_is_there_with_finite_perplexities_at_the_target_size(ablation):
    from metricgp.structured.groups import decoder_params

    rows = ablation.table["rows"]
    singles = {f"0.7|{e}|stability" for e in ablation.estimators}
    recoveries = {"0.7|fused|stability|group-lora", "0.7|fused|stability|lora"}
    assert set(rows) == {"0.7|fused|stability", "0.7|fused+consistency|stability", "0.7|fused|uniform",
                         "0.7|fused|global", "0.7|fused|stability+skip-edge"} | singles | recoveries
    for key, row in rows.items():  # every one-shot row is timed against dense
        if "oneshot" in row:
            speed = row["speed"]
            assert speed["prefill_speedup"] > 0 and speed["decode_speedup"] > 0, key
            assert speed["flops_ratio"] > 1 and speed["param_ratio"] > 1, key
    config = ablation.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    largest_unit = config.num_key_value_heads * 2 * head_dim * config.hidden_size  # a query head per KV group, q + o
    target = round(0.7 * decoder_params(ablation.model))
    for key, row in rows.items():
        assert _finite(row.get("oneshot") or row["recovered"], ablation.datasets), key
        assert 0 <= row["decoder_params"] - target < largest_unit, key
        assert row["achieved_keep"] == pytest.approx(row["decoder_params"] / decoder_params(ablation.model))
        assert row["params"] > row["decoder_params"] and row["git"] and row["command"].startswith("python -m")
    assert all(set(rows[k]["module_keep"]) <= {"model.layers.1.self_attn", "model.layers.1.mlp",
                                               "model.layers.2.self_attn", "model.layers.2.mlp"}
               for k in rows if k.endswith("skip-edge"))
    assert len(rows["0.7|fused|stability"]["module_keep"]) == 8  # every block's attention and MLP
    assert ablation.table["dense_ppl"].keys() == set(ablation.datasets)
    invocation = ablation.table["invocations"][0]
    assert invocation["command"] and "git" in invocation


def test_single_estimators_are_their_own_fusion_and_differ_from_the_fused_row(ablation):
    rows = ablation.table["rows"]
    fused = rows["0.7|fused|stability"]
    assert list(fused["fusion"]) == ablation.estimators
    for e in ablation.estimators:
        row = rows[f"0.7|{e}|stability"]
        assert row["estimators"] == [e] and list(row["fusion"]) == [e]
        (f,) = row["fusion"].values()  # one estimator: weight 1 / (2 sigma^2), sigma^2 = L (1 where L = 0)
        assert f["share"] == 1.0 and f["weight"] == pytest.approx(1 / (2 * f["sigma"] ** 2))
        assert f["sigma"] ** 2 == pytest.approx(f["loss"] if f["loss"] > 0 else 1.0, rel=1e-5)
        assert row["oneshot"] != fused["oneshot"], e
    earlier = rows["0.7|fused+consistency|stability"]
    assert earlier["fusion_rule"] == "consistency" and fused["fusion_rule"] == "uncertainty"
    assert earlier["command"].count("--fusion consistency") == 1 and "--fusion" not in fused["command"]
    steady = [e for e in ablation.estimators if fused["fusion"][e]["inconsistency"] == 0]
    assert steady == ["magnitude"]  # window-independent: the consistency fusion trusts it most
    assert earlier["fusion"]["magnitude"]["weight"] == max(f["weight"] for f in earlier["fusion"].values())
    assert all(0 < f["loss"] < 0.5 for f in fused["fusion"].values())
    assert rows["0.7|fused|uniform"]["oneshot"] != fused["oneshot"]
    assert rows["0.7|fused|stability+skip-edge"]["oneshot"] != fused["oneshot"]


def test_recoveries_have_the_same_budget_and_about_the_same_trainable_parameters(ablation):
    rows = ablation.table["rows"]
    group, lora = rows["0.7|fused|stability|group-lora"], rows["0.7|fused|stability|lora"]
    assert group["tokens"] == lora["tokens"] == 64 and group["rank"] == 8 and lora["rank"] > 8
    assert lora["report"]["group_lora_trainable_params"] == group["trainable_params"]
    assert abs(lora["trainable_params"] - group["trainable_params"]) < 0.2 * group["trainable_params"]
    assert group["recovered"] != rows["0.7|fused|stability"]["oneshot"]


def test_sigma_record_report_and_plot(ablation):
    sigma = ablation.table["sigma"]
    assert list(sigma) == ablation.estimators
    assert all(s["sigma"] > 0 and s["weight"] == pytest.approx(1 / (2 * s["sigma"] ** 2)) for s in sigma.values())
    assert sum(s["share"] for s in sigma.values()) == pytest.approx(1.0)
    assert all(-1 <= s["probe_spearman"] <= 1 and s["loss"] > 0 for s in sigma.values())
    assert (ablation.out / "saap-sigma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (ablation.out / "saap.md").read_text()
    assert "F_bj   = sum_k I_kbj / (2 sigma_k^2)" in md and "rho_m" in md  # the equations, from saap.py
    assert "Spearman vs probes" in md and "fused, consistency fusion (ablation)" in md
    for title in ("### Estimators", "### Allocation", "### Edge blocks", "### Recovery", "## The learned noise"):
        assert title in md
    assert md.count("Lowest perplexity:") == 4 and "The fused importance ranks" in md


def test_the_sigma_record_is_the_most_complete_of_equal_ones():
    old = {"magnitude": {"sigma": 0.4, "loss": 0.16}}
    new = {"magnitude": {"sigma": 0.4, "loss": 0.16, "probe_spearman": 0.2}}
    row = {"importance": saap_experiments.FUSED}
    rows = {"0.7": row | {"fusion": old}, "0.9": row | {"fusion": new}, "0.5": {"importance": "magnitude"}}
    assert saap_experiments.sigma_of(rows) == new
    assert saap_experiments.sigma_of({"0.5": {"importance": "magnitude"}}) is None


def test_rerun_resumes_without_recomputing(ablation, tmp_path, monkeypatch):
    import metricgp.evaluate

    out = tmp_path / "out"
    shutil.copytree(ablation.out, out)
    monkeypatch.setenv("METRICGP_CACHE", str(ablation.root / "cache"))
    real, calls = metricgp.evaluate.perplexity, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metricgp.evaluate, "perplexity", counted)
    monkeypatch.setattr(saap_experiments.ex, "perplexity", counted)  # the rows' own import of it
    assert main([*ablation.args, "--out", str(out)]) == 0
    again = json.loads((out / "saap.json").read_text())
    assert again["rows"] == ablation.table["rows"] and calls == []  # dense perplexities come from the disk cache
    assert len(again["invocations"]) == 2

    table = json.loads((out / "saap.json").read_text())
    del table["rows"]["0.7|fused|uniform"]
    (out / "saap.json").write_text(json.dumps(table))
    assert main([*ablation.args, "--out", str(out)]) == 0
    again = json.loads((out / "saap.json").read_text())
    assert len(calls) == len(ablation.datasets)  # the one missing row, on each dataset
    strip = ("seconds", "git", "speed")  # timings differ from run to run
    assert ({k: v for k, v in again["rows"]["0.7|fused|uniform"].items() if k not in strip}
            == {k: v for k, v in ablation.table["rows"]["0.7|fused|uniform"].items() if k not in strip})


@pytest.mark.parametrize(("extra", "message"), [
    (["--estimators", "wanda,nope"], "unknown estimator 'nope'"),
    (["--estimators", "wanda,missing.json"], "metric file not found"),
    (["--keeps", "0.7,1.5"], "--keeps must be in (0, 1]"),
    (["--keeps", "0"], "--keeps must be in (0, 1]"),
    (["--keeps", "x"], "--keeps must be comma-separated numbers"),
    (["--group-finetune-groups", "0"], "--group-finetune-groups"),
])
def test_bad_input_is_one_line_and_exit_2(ablation, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(saap_experiments.ex, "pruning_setup", lambda args: pytest.fail("loaded the model"))
    out = tmp_path / "out"
    assert main([*ablation.args, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_other_settings_need_another_out(ablation, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(ablation.out, out)
    assert main([*ablation.args, "--eval-windows", "3", "--out", str(out)]) == 2
    assert "other settings (eval_windows)" in capsys.readouterr().err


def test_a_rows_command_reproduces_it(ablation, tmp_path, monkeypatch):
    """The recorded `python -m metricgp.apply` command (with this test's model and data) gives the row."""
    import shlex

    from metricgp.cli.apply import main as apply_main

    monkeypatch.setenv("METRICGP_CACHE", str(ablation.root / "cache"))
    row = ablation.table["rows"]["0.7|fused|uniform"]
    argv = shlex.split(row["command"])[3:]
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    settings = ablation.table["settings"]
    assert apply_main([*argv, "--model", settings["model"], "--calib", settings["calib"], "--seqlen", "32",
                       "--no-save-model"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["perplexity"]["pruned"] == pytest.approx(row["oneshot"], rel=1e-6)
    assert report["size"]["decoder_params"]["pruned"] == row["decoder_params"]
