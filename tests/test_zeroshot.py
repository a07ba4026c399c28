"""Zero-shot accuracy through lm-evaluation-harness (`--zero-shot`, metricgp/zeroshot.py), offline: the
tests write their own small multiple-choice tasks (lm-eval's `dataset_path: json`) and run them on the
tiny saved model."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from metricgp.cli.apply import main
from metricgp.zeroshot import ZeroShot, summarise, table_lines, zero_shot_report

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
WITH_NORM, WITHOUT_NORM = "toy_with_norm", "toy_acc_only"
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
{metrics}metadata:
  version: 2.0
"""


def _metric(name: str) -> str:
    return f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n"


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """Two made-up 16-item tasks over the tiny tokenizer's words, choices of different lengths (so that
    acc and acc_norm can disagree): one scored with acc and acc_norm, one with acc only."""
    from conftest import WORDS

    root = tmp_path_factory.mktemp("zeroshot-tasks")
    rng = random.Random(0)
    items = []
    for i in range(16):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        items.append({"question": " ".join(rng.choice(WORDS) for _ in range(8)), "choices": choices, "answer": i % 4})
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    for name, metrics in ((WITH_NORM, ("acc", "acc_norm")), (WITHOUT_NORM, ("acc",))):
        (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data,
                                                            metrics="".join(_metric(m) for m in metrics)))
    return root


@pytest.fixture(scope="session")
def sharp_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama's shape and tokenizer with 15x larger random weights: the blocks, not only the
    embeddings, decide between the choices, so pruning them changes the accuracy."""
    from conftest import save_tiny_variant

    return save_tiny_variant(tmp_path_factory.mktemp("sharp-llama"), tiny_llama_dir, initializer_range=0.3)


@pytest.fixture()
def base_args(sharp_llama_dir, text_files, isolated_cache):
    return ["--model", str(sharp_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "2",
            "--seqlen", "32", "--dataset", str(text_files["test"]), "--eval-windows", "2"]


def _lm_eval_itself(model, tokenizer, task_dir: Path, limit: int | None = None) -> dict:
    """acc/acc_norm of lm-eval's own simple_evaluate, without metricgp in between."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
                          tasks=[WITH_NORM, WITHOUT_NORM], num_fewshot=0, limit=limit, log_samples=False,
                          task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return {task: {k.split(",")[0]: v for k, v in r.items() if k in ("acc,none", "acc_norm,none")}
            for task, r in out["results"].items()}


def _accuracies(result: dict) -> dict:
    return {task: {m: r[m] for m in ("acc", "acc_norm") if m in r} for task, r in result["tasks"].items()}


def test_apply_zero_shot_equals_lm_eval_on_the_same_models(tmp_path, base_args, task_dir, sharp_llama_dir, capsys):
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pz24"
    assert main([*base_args, "--metric", "magnitude", "--pattern", "2:4", "--zero-shot", str(task_dir),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    zs = report["zero_shot"]
    assert zs["lm_eval"] == lm_eval.__version__ and zs["num_fewshot"] == 0 and zs["limit"] is None
    assert zs["tasks_run"] == [WITHOUT_NORM, WITH_NORM]  # a directory's tasks in the order of their files
    assert zs["task_versions"] == {WITH_NORM: 2.0, WITHOUT_NORM: 2.0}
    assert zs["n_shot"] == {WITH_NORM: 0, WITHOUT_NORM: 0}
    assert {"dense_zero_shot", "pruned_zero_shot"} <= set(report["timings_s"])

    dense = AutoModelForCausalLM.from_pretrained(sharp_llama_dir, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is None  # lm-eval gave only its own copy a pad token
    expected = {"dense": _lm_eval_itself(dense, tokenizer, task_dir),
                "pruned": _lm_eval_itself(pruned, tokenizer, task_dir)}
    assert {label: _accuracies(r) for label, r in zs["models"].items()} == expected
    assert expected["dense"] != expected["pruned"]  # so the comparison tells the two models apart

    # acc and acc_norm side by side, never mixed: acc_norm is averaged over the task that has it only
    for r in zs["models"].values():
        assert "acc_norm" not in r["tasks"][WITHOUT_NORM]
        assert r["mean"]["acc"]["tasks"] == [WITHOUT_NORM, WITH_NORM]
        assert r["mean"]["acc"]["value"] == pytest.approx((r["tasks"][WITH_NORM]["acc"]
                                                           + r["tasks"][WITHOUT_NORM]["acc"]) / 2)
        assert r["mean"]["acc_norm"] == {"value": r["tasks"][WITH_NORM]["acc_norm"], "tasks": [WITH_NORM]}
        assert r["tasks"][WITH_NORM]["items"] == 16
    assert f"acc_norm over 1 task ({WITH_NORM})" in printed
    assert f"| {WITHOUT_NORM} acc | {WITH_NORM} acc | mean acc | {WITH_NORM} acc_norm | mean acc_norm |" in printed
    assert printed.count("| dense |") == 1 and printed.count("| pruned |") == 1


def test_structured_model_with_per_layer_widths_in_memory_and_reloaded(tmp_path, base_args, task_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import metricgp

    out = tmp_path / "s70"
    assert main(["--structured", *base_args, "--metric", "wanda", "--keep", "0.7", "--zero-shot", str(task_dir),
                 "--zero-shot-limit", "12", "--no-dense-eval", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    per_layer = report["per_layer"]  # each block's sizes where they differ from the config's
    assert per_layer and per_layer.get("0") != per_layer.get("1")  # the two blocks have widths of their own
    zs = report["zero_shot"]
    assert list(zs["models"]) == ["pruned"] and zs["limit"] == 12  # --no-dense-eval: no dense accuracy
    in_memory = _accuracies(zs["models"]["pruned"])
    assert zs["models"]["pruned"]["tasks"][WITH_NORM]["items"] == 12

    evaluation = ZeroShot.parse(str(task_dir), limit=12)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for reloaded in (metricgp.load_pruned(out), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)):
        assert _accuracies(evaluation.evaluate(reloaded.eval(), tokenizer)) == in_memory
    assert _lm_eval_itself(metricgp.load_pruned(out), tokenizer, task_dir, limit=12) == in_memory


def test_summary_keeps_acc_and_acc_norm_apart_over_groups_and_tasks():
    """lm-eval's output shape (results, groups, group_subtasks): a group with its own aggregate counts
    once, a group without one counts as its subtasks, and each metric's mean names its tasks."""
    out = {
        "results": {"a": {"acc,none": 0.5, "acc_norm,none": 0.7, "acc_stderr,none": "N/A"},
                    "b": {"acc,none": 0.2}, "c1": {"acc,none": 0.1, "acc_norm,none": 0.3},
                    "c2": {"acc,none": 0.3, "acc_norm,none": 0.5}, "s1": {"acc,none": 0.9}, "s2": {"acc,none": 0.4}},
        "groups": {"grp": {"acc,none": 0.6}},
        "group_subtasks": {"grp": ["s1", "s2"], "plain": ["c1", "c2"]},
        "versions": {"a": 1.0, "b": 0}, "n-shot": {"a": 0, "b": 0}, "n-samples": {"a": {"effective": 7}},
    }
    result = summarise(out, ["a", "b", "plain", "grp"])
    assert list(result["tasks"]) == ["a", "b", "c1", "c2", "grp"]
    assert result["tasks"]["a"] == {"acc": 0.5, "acc_stderr": None, "acc_norm": 0.7, "acc_norm_stderr": None,
                                    "items": 7, "group": False}
    assert result["tasks"]["grp"]["group"] and result["tasks"]["grp"]["acc"] == 0.6
    assert result["mean"]["acc"]["tasks"] == ["a", "b", "c1", "c2", "grp"]
    assert result["mean"]["acc"]["value"] == pytest.approx((0.5 + 0.2 + 0.1 + 0.3 + 0.6) / 5)
    assert result["mean"]["acc_norm"]["tasks"] == ["a", "c1", "c2"]
    assert result["mean"]["acc_norm"]["value"] == pytest.approx((0.7 + 0.3 + 0.5) / 3)


def test_shipped_example_task_runs_offline_and_leaves_the_random_state(monkeypatch):
    from conftest import make_text, tiny_model, train_tokenizer

    monkeypatch.chdir(ROOT)  # its data file is relative to the repository root, as the README says
    evaluation = ZeroShot.parse("tests/data/zeroshot_toy", limit=4)
    assert evaluation.check() == ["metricgp_toy_mc"]
    tokenizer = train_tokenizer(make_text(600, 0))
    model = tiny_model("llama", vocab=len(tokenizer))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    result = evaluation.evaluate(model, tokenizer)
    assert torch.equal(torch.rand(3), expected)  # lm-eval's seeding did not leak into the caller
    assert result["tasks"]["metricgp_toy_mc"]["items"] == 4
    report = zero_shot_report(evaluation, {"dense": result})
    assert report["task_versions"] == {"metricgp_toy_mc": 1.0} and report["limit"] == 4
    assert "first 4 items of each task" in table_lines(report)[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--zero-shot-limit", "3"], "--zero-shot-limit and --zero-shot-batch-size need --zero-shot TASKS"),
    (["--zero-shot", "TASKS", "--zero-shot-limit", "0"], "--zero-shot-limit must be at least 1, got 0"),
    (["--zero-shot", "/no/such/tasks"], "--zero-shot /no/such/tasks: no such file or directory"),
    (["--zero-shot", "ITEMS"], "a local task is a directory or a .yaml file"),
    (["--zero-shot", "BROKEN"], "--zero-shot: could not load the tasks toy_broken: "),
])
def test_zero_shot_user_errors_before_the_model_loads(tmp_path, base_args, task_dir, monkeypatch, capsys,
                                                      extra, message):
    _refuse_model_loading(monkeypatch)
    out = tmp_path / "out"
    broken = tmp_path / "broken.yaml"  # its data file does not exist
    broken.write_text(TASK_YAML.format(name="toy_broken", data=tmp_path / "missing.jsonl", metrics=_metric("acc")))
    extra = [{"TASKS": str(task_dir), "ITEMS": str(task_dir / "items.jsonl"), "BROKEN": str(broken)}.get(a, a)
             for a in extra]
    assert main([*base_args, "--metric", "wanda", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _refuse_model_loading(monkeypatch) -> None:
    import metricgp.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the zero-shot options were checked")

    monkeypatch.setattr(metricgp.evaluate, "load_model", refuse)


@pytest.mark.parametrize("command", ["apply", "structured", "compare", "darwin"])
def test_missing_extra_is_one_line_naming_it_before_any_work(tmp_path, base_args, monkeypatch, capsys, command):
    from metricgp.cli.darwin import main as darwin_main
    from metricgp.experiments.compare import main as compare_main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError, as when absent
    _refuse_model_loading(monkeypatch)
    out = tmp_path / "out"
    args = [*base_args, "--zero-shot", "boolq", "--out", str(out)]
    run = {"apply": lambda: main([*args, "--metric", "wanda"]),
           "structured": lambda: main(["--structured", *args, "--metric", "wanda"]),
           "compare": lambda: compare_main([*args, "--metric", "wanda", "--settings", "0.5", "--modes", "oneshot"]),
           "darwin": lambda: darwin_main([*args, "--metric", "wanda", "--generations", "1"])}[command]
    assert run() == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --zero-shot needs lm-evaluation-harness, an optional extra: pip install 'metricgp[eval]'"
    assert not out.exists()


def test_compare_rows_get_accuracy_once_and_refuse_other_settings(tmp_path, base_args, task_dir, monkeypatch,
                                                                 capsys):
    from metricgp.experiments.compare import main as compare_main

    out = tmp_path / "cmp"
    args = [*base_args, "--metric", "magnitude", "--settings", "0.5", "--modes", "oneshot", "--out", str(out)]
    assert compare_main(args) == 0  # perplexity only first: the rows are finished
    assert compare_main([*args, "--zero-shot", str(task_dir), "--zero-shot-limit", "8"]) == 0  # accuracy added
    table = json.loads((out / "table.json").read_text())
    zs = table["zero_shot"]
    assert zs["limit"] == 8 and list(zs["models"]) == ["dense"]
    row = table["rows"]["abs(W)|0.5|oneshot"]
    assert set(row["zero_shot"]) == {"tasks", "mean", "seconds"} and row["perplexity"]
    assert row["zero_shot"]["tasks"][WITH_NORM]["items"] == 8
    md = (out / "table.md").read_text()
    assert "## Zero-shot accuracy" in md and "| dense |" in md and "| magnitude 50% oneshot |" in md

    def refuse(*_a, **_k):
        raise AssertionError("measured a finished row again")

    monkeypatch.setattr(ZeroShot, "evaluate", refuse)
    assert compare_main([*args, "--zero-shot", str(task_dir), "--zero-shot-limit", "8"]) == 0
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]
    capsys.readouterr()
    assert compare_main([*args, "--zero-shot", str(task_dir), "--zero-shot-limit", "4"]) == 2
    assert "holds zero-shot accuracy measured with other settings" in capsys.readouterr().err


def _darwin_args(model_dir, text_files, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--calib", str(text_files["calib"]), "--n-calib", "2", "--seqlen", "32",
            "--dataset", str(text_files["test"]), "--eval-windows", "2", "--offspring", "2", "--generations", "1",
            "--survivors", "1", "--fitness-windows", "1", "--metric", "wanda", "--no-speed", "--no-progress",
            "--out", str(out), *extra]


def test_darwin_final_report_dense_pruned_recovered_and_reloaded(tmp_path, tiny_llama_dir, text_files, task_dir,
                                                                isolated_cache, capsys):
    from transformers import AutoTokenizer

    import metricgp
    from metricgp.cli.darwin import main as darwin_main

    out = tmp_path / "darwin"
    assert darwin_main(_darwin_args(tiny_llama_dir, text_files, out, "--keep", "0.7", "--recover-tokens", "64",
                                    "--zero-shot", str(task_dir), "--zero-shot-limit", "8")) == 0
    assert "| recovered |" in capsys.readouterr().out
    zs = json.loads((out / "report.json").read_text())["zero_shot"]
    assert list(zs["models"]) == ["dense", "pruned", "recovered"] and zs["limit"] == 8
    assert "| recovered |" in (out / "README.md").read_text()
    reloaded = metricgp.load_pruned(out / "model")  # the saved model is the recovered one
    result = ZeroShot.parse(str(task_dir), limit=8).evaluate(reloaded, AutoTokenizer.from_pretrained(out / "model"))
    assert _accuracies(result) == _accuracies(zs["models"]["recovered"])


def test_darwin_resume_adds_accuracy_to_every_unstructured_allocation(tmp_path, tiny_llama_dir, text_files,
                                                                      task_dir, isolated_cache):
    from metricgp.cli.darwin import main as darwin_main

    out = tmp_path / "evo"
    assert darwin_main(_darwin_args(tiny_llama_dir, text_files, out, "--unstructured", "--sparsity", "0.5",
                                    "--no-save-model")) == 0
    assert "zero_shot" not in json.loads((out / "report.json").read_text())
    assert darwin_main(["--resume", str(out), "--zero-shot", str(task_dir), "--zero-shot-limit", "4",
                        "--no-progress"]) == 0
    zs = json.loads((out / "report.json").read_text())["zero_shot"]
    assert list(zs["models"]) == ["dense", "uniform", "owl", "evopress"]
    resumed = json.loads((out / "config.json").read_text())["resumes"]
    assert resumed[-1]["overrides"] == {"zero_shot": str(task_dir), "zero_shot_limit": 4}
