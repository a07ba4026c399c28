"""The noise floor of `python -m metricgp.compare` (--calib-seeds, --window-sets) on a tiny model:
rows per seed and window set, recombination, paired statistics, the significance rule, resuming,
bad input, and the classic single-seed output left as it was."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import pytest

from metricgp.evaluate import PruningSetup
from metricgp.experiments.compare import Entry, build_parser, context_of, main, markdown
from metricgp.experiments.noise import (
    combine,
    noise_options,
    parse_args,
    plot_relative,
    split_windows,
    summarise,
    verdict_lines,
)
from metricgp.expr import resolve_metric

ROOT = Path(__file__).resolve().parents[1]
WANDA, MAGNITUDE = "mul(abs(W), sqrt(X))", "abs(W)"


def common(model: Path, text_files: dict) -> list[str]:
    return ["--model", str(model), "--calib", str(text_files["calib"]), "--n-calib", "4", "--seqlen", "32",
            "--dataset", str(text_files["test"]), "--eval-windows", "4", "--settings", "0.5", "--modes", "oneshot"]


def noise_args(model: Path, text_files: dict, out: Path, seeds: str = "0,1") -> list[str]:
    return [*common(model, text_files), "--metric", "wanda", "--metric", "magnitude", "--calib-seeds", seeds,
            "--window-sets", "2", "--out", str(out)]


def load(out: Path) -> dict:
    return json.loads((out / "table.json").read_text())


@pytest.fixture(scope="module")
def tables(tmp_path_factory, tiny_llama_dir, text_files):
    """A noise table (wanda and magnitude, seeds 0 and 1, two window sets) and a classic
    single-seed table of wanda with calibration seed 1, in one statistics cache."""
    root = tmp_path_factory.mktemp("noise")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METRICGP_CACHE", str(root / "cache"))
        assert main(noise_args(tiny_llama_dir, text_files, root / "noise")) == 0
        single = [*common(tiny_llama_dir, text_files), "--metric", "wanda", "--calib-seed", "1",
                  "--out", str(root / "single")]
        assert main(single) == 0
        yield {"root": root, "noise": load(root / "noise"), "single": load(root / "single"),
               "test": str(text_files["test"])}


def sets_of(table: dict, formula: str, seed: int, data: str) -> list[float]:
    return [table["rows"][f"{formula}|0.5|oneshot|seed={seed}|set={j}/2"]["perplexity"][data] for j in (1, 2)]


def test_a_row_per_seed_and_window_set(tables):
    table, data = tables["noise"], tables["test"]
    assert set(table["rows"]) == {f"{f}|0.5|oneshot|seed={s}|set={j}/2"
                                  for f in (WANDA, MAGNITUDE) for s in (0, 1) for j in (1, 2)}
    row = table["rows"][f"{WANDA}|0.5|oneshot|seed=1|set=2/2"]
    assert row["seed"] == 1 and row["window_set"] == "2/2" and row["sparsity"] == 0.5
    # another calibration sample gives wanda (which reads X) other masks, so other perplexities;
    # magnitude reads no statistics and is the same on both seeds
    assert sets_of(table, WANDA, 0, data) != sets_of(table, WANDA, 1, data)
    assert sets_of(table, MAGNITUDE, 0, data) == sets_of(table, MAGNITUDE, 1, data)
    # the window sets are consecutive, disjoint and cover the evaluated windows
    ranges = [table["rows"][f"{WANDA}|0.5|oneshot|seed=0|set={j}/2"]["windows"][data] for j in (1, 2)]
    assert ranges == [[0, 2], [2, 4]] and table["windows"][data] == 4
    assert table["context"]["seed"] is None and table["context"]["window_sets"] == 2
    assert table["layout"]["seeds"] == [0, 1] and table["provenance"]["git"] and table["history"]
    assert (tables["root"] / "noise" / "table-relative.png").stat().st_size > 1000
    md = (tables["root"] / "noise" / "table.md").read_text()
    assert "**Rule:** significant when |mean paired difference| > 2 x" in md and "## Verdict" in md


def test_window_sets_recombine_to_the_all_windows_perplexity(tables):
    data = tables["test"]
    a, b = sets_of(tables["noise"], WANDA, 1, data)
    whole = tables["single"]["rows"][f"{WANDA}|0.5|oneshot"]["perplexity"][data]  # --calib-seed 1, all 4 windows
    assert math.sqrt(a * b) == pytest.approx(whole, rel=1e-6)  # two windows each: exp of the mean NLL
    assert combine([a, b], [2, 2]) == pytest.approx(whole, rel=1e-6)
    group = tables["noise"]["noise"]["groups"][0]
    wanda = next(c for c in group["metrics"] if c["metric"] == "wanda")
    assert wanda["perplexity"]["per_seed"][1] == pytest.approx(whole, rel=1e-6)
    assert tables["noise"]["dense"] == tables["single"]["dense"]


def test_paired_differences_equal_a_hand_computation(tables):
    table, data = tables["noise"], tables["test"]
    group = table["noise"]["groups"][0]
    assert group["windows"] == [[0, 2], [2, 4]]
    cell = next(c for c in group["metrics"] if c["metric"] == "magnitude")["vs_reference"]

    def ppl(formula, seed):
        return math.sqrt(math.prod(sets_of(table, formula, seed, data)))

    diffs = [100 * (ppl(MAGNITUDE, s) / ppl(WANDA, s) - 1) for s in (0, 1)]
    assert cell["seeds"] == [0, 1] and cell["per_seed"] == pytest.approx(diffs, rel=1e-9)
    assert cell["mean"] == pytest.approx(statistics.mean(diffs))
    assert cell["std"] == pytest.approx(statistics.stdev(diffs))
    per_set = [[100 * (sets_of(table, MAGNITUDE, s, data)[j] / sets_of(table, WANDA, s, data)[j] - 1) for s in (0, 1)]
               for j in (0, 1)]
    assert [d["mean"] for d in cell["sets"]] == pytest.approx([statistics.mean(d) for d in per_set])
    same_sign = all(statistics.mean(d) * cell["mean"] > 0 for d in per_set)
    significant = abs(statistics.mean(diffs)) > 2 * statistics.stdev(diffs) and same_sign
    expected = ("worse" if cell["mean"] > 0 else "better") if significant else "within noise"
    assert cell["verdict"] == expected
    band = next(c for c in group["metrics"] if c["metric"] == "wanda")["perplexity"]
    assert group["band_percent"] == pytest.approx(200 * band["std"] / band["mean"])


def with_fake_metric(table: dict, label: str, formula: str, factor) -> Entry:
    """Rows of a made-up metric: wanda's rows with perplexity x factor(seed, set index)."""
    for key, row in list(table["rows"].items()):
        if key.startswith(f"{WANDA}|"):
            seed, j = row["seed"], int(row["window_set"].split("/")[0]) - 1
            fake = {**row, "label": label, "formula": formula,
                    "perplexity": {d: v * factor(seed, j) for d, v in row["perplexity"].items()}}
            table["rows"][key.replace(WANDA, formula, 1)] = fake
    return Entry(label, resolve_metric(formula))


def test_the_rule_flags_clearly_different_metrics_only(tables, tmp_path):
    table = copy.deepcopy(tables["noise"])
    entries = [Entry("wanda", resolve_metric("wanda")), Entry("magnitude", resolve_metric("magnitude"))]
    fakes = {"worse": ("mul(abs(W), X)", lambda s, j: 1.5 + 0.01 * s),  # +50%, +51%: far beyond the spread
             "better": ("mul(sqr(W), X)", lambda s, j: 0.9 - 0.001 * s),
             "noisy": ("mul(abs(W), sqrt(sqrt(X)))", lambda s, j: (1.05, 0.97)[s]),  # |mean| 1% < 2 x std 5.7%
             "flips": ("mul(sqr(W), sqrt(X))", lambda s, j: (1.10, 0.95)[j]),  # +2.2% every seed, set 2 says -5%
             "far": ("mul(abs(W), sqr(X))", lambda s, j: 3.0)}  # +200%: clipped in the plot
    entries += [with_fake_metric(table, label, f, factor) for label, (f, factor) in fakes.items()]
    summary = summarise(table, entries, ["0.5"], ["oneshot"], [tables["test"]], [0, 1], 2, "wanda")
    verdicts = {c["metric"]: c["vs_reference"]["verdict"] for c in summary["groups"][0]["metrics"]}
    assert verdicts["worse"] == "worse" and verdicts["far"] == "worse" and verdicts["better"] == "better"
    assert verdicts["noisy"] == "within noise" and verdicts["flips"] == "within noise"
    assert verdicts["wanda"] == "reference"
    flips = next(c for c in summary["groups"][0]["metrics"] if c["metric"] == "flips")["vs_reference"]
    assert flips["std"] == pytest.approx(0, abs=1e-9) and flips["mean"] > 0  # only the window sets stop it
    lines = verdict_lines(summary)
    assert lines[0].startswith("- significantly better than wanda: better on ")
    assert "worse on" in lines[1] and "far on" in lines[1] and "noisy" not in "".join(lines)
    plot_relative(summary, tmp_path / "relative.png")
    assert (tmp_path / "relative.png").stat().st_size > 1000


def test_resume_prints_the_verdict_and_new_seeds_add_only_their_rows(tables, tiny_llama_dir, text_files,
                                                                       tmp_path, monkeypatch, capsys):
    out = tmp_path / "noise"
    out.mkdir()
    (out / "table.json").write_text(json.dumps(tables["noise"]))
    pruned = []
    original = PruningSetup.prune

    def counting(self, tree, pattern, mode="oneshot"):
        pruned.append((self.spec.seed, str(tree)))
        return original(self, tree, pattern, mode)

    monkeypatch.setattr(PruningSetup, "prune", counting)
    capsys.readouterr()
    assert main(noise_args(tiny_llama_dir, text_files, out)) == 0
    assert pruned == [] and load(out)["rows"] == tables["noise"]["rows"]
    printed = capsys.readouterr().out
    assert [line[2:] for line in verdict_lines(load(out)["noise"])] == printed.strip().splitlines()[1:]
    assert main(noise_args(tiny_llama_dir, text_files, out, seeds="0,1,2")) == 0
    assert sorted(pruned) == [(2, MAGNITUDE), (2, WANDA)]
    extended = load(out)
    assert extended["layout"]["seeds"] == [0, 1, 2] and len(extended["rows"]) == 12
    assert all(extended["rows"][k] == v for k, v in tables["noise"]["rows"].items())
    assert extended["noise"]["groups"][0]["metrics"][0]["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("extra, message", [
    (["--calib-seeds", "a,b"], "comma-separated integers"),
    (["--calib-seeds", "0,0"], "repeats"),
    (["--window-sets", "0"], "at least 1"),
    (["--window-sets", "5"], "more than the 4 --eval-windows"),
    (["--calib-seed", "1", "--calib-seeds", "0,1"], "not both"),
    (["--reference", "wanda"], "needs --calib-seeds"),
    (["--calib-seeds", "0,1", "--reference", "ria"], "not among the compared metrics"),
    (["--eval-windows", "0", "--window-sets", "100000"], "more than the"),  # found only after loading the data
])
def test_bad_input_is_one_line_and_writes_nothing(extra, message, tmp_path, tiny_llama_dir, text_files,
                                                  isolated_cache, capsys):
    out = tmp_path / "out"
    assert main([*common(tiny_llama_dir, text_files), "--metric", "wanda", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars, when the model loaded, then the error
    assert [line for line in err if line.startswith("error")] == err[-1:] and message in err[-1]
    assert not out.exists()


def test_split_windows():
    assert split_windows(32, 2) == [(0, 16), (16, 32)]
    assert split_windows(5, 2) == [(0, 3), (3, 5)]
    assert split_windows(3, 3) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("stem", ["results/baselines/table", "results/smollm2-default-s0/report"])
def test_the_single_seed_output_is_unchanged(stem):
    """Without --calib-seeds/--window-sets: the context a table is resumed under, and the committed
    markdown, come out as they were."""
    table = json.loads((ROOT / f"{stem}.json").read_text(), parse_constant=lambda _: math.inf)
    args = parse_args(build_parser(), [])
    assert noise_options(args) is None and args.calib_seed == 0
    assert context_of(args, table["context"]["fingerprint"]) == table["context"]
    every = [Entry(label, resolve_metric(d["functional"])) for label, d in table["metrics"].items()]
    layout = table["layout"]
    shown = markdown(table, every, layout["settings"], layout["modes"], layout["datasets"])
    assert shown == (ROOT / f"{stem}.md").read_text()
