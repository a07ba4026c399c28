"""`python -m metricgp.compare`: test perplexity of metrics x sparsity settings x modes x datasets.

    python -m metricgp.compare --out results/baselines                 # the built-ins (make baselines)
    python -m metricgp.compare --run results/smollm2-default-s0 \\
        --settings 0.5,2:4,4:8,0.6 --dataset wikitext2,c4,ptb           # a search's report.md
    python -m metricgp.compare --calib-seeds 0,1,2 --window-sets 2 ...  # the noise floor (make noise-floor)
    python -m metricgp.compare --metric wanda --settings 0.5 --modes oneshot \
        --zero-shot boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa --out runs/zs  # + accuracy

The model and its statistics load once; every row restores the dense weights, prunes and
evaluates. Rows are written to the JSON table as they finish, so an interrupted comparison
continues where it stopped when run again with the same arguments. With `--calib-seeds` and/or
`--window-sets` a row is one (metric, setting, mode, calibration seed, window set) cell and the
report is the noise floor of noise.py: mean ± std over seeds and paired differences to
`--reference`. With `--zero-shot TASKS` every row (and the dense model, before any pruning) also
gets lm-evaluation-harness accuracy (metricgp.zeroshot: acc and acc_norm apart, each with its mean);
a resumed table adds it to rows that lack it, and refuses a table holding other zero-shot settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from metricgp.cli.options import (
    add_model_data_options,
    add_zero_shot_options,
    evaluator_spec,
    model_data_fields,
    zero_shot_from_args,
)
from metricgp.data import parse_report_data
from metricgp.errors import MetricGPError, cli_entry
from metricgp.evaluate import PruningSetup, cached_dense_perplexity
from metricgp.experiments import noise as floor
from metricgp.experiments.noise import row_key, setting_label
from metricgp.expr import (
    BUILTIN_METRICS,
    Node,
    canonical_key,
    describe,
    formula_from_file,
    resolve_metric,
    to_functional,
)
from metricgp.measure import perplexity
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import provenance, write_json_atomic
from metricgp.prune.engine import PRUNE_MODES
from metricgp.prune.patterns import parse_setting
from metricgp.zeroshot import ZeroShot, table_lines, zero_shot_report

if TYPE_CHECKING:
    from metricgp.evaluate import EvaluatorSpec, PruningSetup

BASELINES = tuple(BUILTIN_METRICS)


@dataclass(frozen=True)
class Entry:
    """One metric to compare: a label for tables and its tree."""

    label: str
    tree: Node


def parse_metric_arg(text: str) -> Entry:
    """'wanda' | 'LABEL=FORMULA' | 'LABEL=path/best.json' | a formula."""
    label, sep, body = text.partition("=")
    if not sep or "(" in label or " " in label.strip():
        label, body = text, text
    path = Path(body)
    if body.endswith(".json"):
        return Entry(label.strip(), resolve_metric(formula_from_file(path)))
    return Entry(label.strip(), resolve_metric(body))


def run_entries(run_dir: Path, top: int) -> list[Entry]:
    """The best `top` formulas of a search run's hall of fame that are not built-in metrics (a
    seeded built-in that stays on top is compared under its own name, among the baselines)."""

    path = run_dir / "hall_of_fame.json"
    if not path.is_file():
        raise MetricGPError(f"{run_dir} has no hall_of_fame.json (is it a search run directory?)")
    builtin = {canonical_key(resolve_metric(name)) for name in BUILTIN_METRICS}
    out: list[Entry] = []
    for e in json.loads(path.read_text(encoding="utf-8"))["entries"]:
        tree = resolve_metric(e["functional"])
        if canonical_key(tree) not in builtin and len(out) < top:
            out.append(Entry(f"evolved #{e['rank']}", tree))
    return out


def parse_settings(text: str) -> list[str]:
    """'0.5,2:4,0.6' -> canonical setting strings (`Pattern.setting`, the table's row keys); validated
    by the pattern registry (metricgp.prune.patterns.parse_setting)."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            out.append(parse_setting(item).setting)
        except MetricGPError as err:
            raise MetricGPError(f"bad setting '{item}': {err} (a sparsity such as 0.5, or a pattern such as "
                                "2:4 or unstructured-layer@0.5)") from None
    if not out:
        raise MetricGPError("--settings names nothing")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metric", action="append", default=None, metavar="[LABEL=]METRIC",
                   help="a built-in, a formula or a best.json; repeat for several "
                        f"(default: {', '.join(BASELINES)})")
    p.add_argument("--run", type=Path, help="add the top formulas of this search run; writes its report.md")
    p.add_argument("--top", type=int, default=2, help="formulas taken from --run (default 2)")
    p.add_argument("--settings", default="0.5,2:4", help="comma-separated sparsities / N:M (default 0.5,2:4)")
    p.add_argument("--modes", default="oneshot,sequential", help="comma-separated modes (default both)")
    p.add_argument("--dataset", default="wikitext2", help="comma-separated test data (default wikitext2)")
    p.add_argument("--eval-windows", type=int, default=32, help="first N test windows (0: all; default 32)")
    add_model_data_options(p)
    floor.add_noise_options(p)
    p.add_argument("--out", type=Path, help="output directory (default: --run's directory)")
    p.add_argument("--reuse", type=Path, action="append", metavar="TABLE_JSON",
                   help="take finished rows from another table made with the same model and data settings")
    p.add_argument("--name", default=None, help="file stem of the table (default 'table', or 'report' with --run)")
    add_zero_shot_options(p)
    return p


def context_of(args: argparse.Namespace, fingerprint: str, noise: floor.NoiseOptions | None = None) -> dict:
    """What makes two tables' numbers comparable; a resumed table must match it. ("seed" is the
    calibration seed: the key keeps its name so that earlier tables stay reusable. A noise table
    keeps the seed in each row key instead, so that more seeds can join it, and adds its window sets.)"""
    fields = model_data_fields(args)
    context = {"model": fields["model"], "fingerprint": fingerprint, "dtype": fields["dtype"],
               "calib": fields["calib"], "n_calib": fields["n_calib"], "seqlen": fields["seqlen"],
               "seed": fields["seed"], "eval_windows": args.eval_windows}
    if noise is not None:
        context.update(seed=None, window_sets=noise.window_sets)
    return context


def reference_entry(entries: list[Entry], name: str) -> Entry:
    """The compared metric `--reference` names, by label or by formula."""
    for e in entries:
        if e.label == name:
            return e
    try:
        wanted = to_functional(resolve_metric(name))
    except MetricGPError:
        wanted = None
    for e in entries:
        if to_functional(e.tree) == wanted:
            return e
    labels = ", ".join(e.label for e in entries)
    raise MetricGPError(f"--reference '{name}' is not among the compared metrics ({labels})")


def output_of(args: argparse.Namespace) -> tuple[Path, str]:
    """The output directory and file stem: --out/table, or the run directory/report with --run."""
    out = args.out or args.run
    if out is None:
        raise MetricGPError("give --out (or --run)")
    return out, args.name or ("report" if args.run and not args.out else "table")


ZERO_SHOT_IDENTITY = ("lm_eval", "tasks", "tasks_run", "num_fewshot", "limit")  # what makes accuracies comparable


def run(args: argparse.Namespace) -> dict:
    noise = floor.noise_options(args)  # None: the classic single-seed table
    if noise is not None and args.zero_shot is not None:
        raise MetricGPError("--zero-shot gives one accuracy per row: not with --calib-seeds or --window-sets")
    zero_shot = zero_shot_from_args(args)  # lm-eval, the tasks and their data: checked before the model loads
    entries = [parse_metric_arg(m) for m in (args.metric or ([] if args.run else BASELINES))]
    if args.run is not None:
        entries = run_entries(args.run, args.top) + entries
        if not args.metric:
            entries += [parse_metric_arg(m) for m in BASELINES]
    reference = reference_entry(entries, noise.reference).label if noise else None
    settings = parse_settings(args.settings)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in PRUNE_MODES:
            raise MetricGPError(f"unknown mode '{mode}' (choose from {', '.join(PRUNE_MODES)})")
    datasets = parse_report_data(args.dataset)
    out, name = output_of(args)
    table_path = out / f"{name}.json"

    spec = evaluator_spec(args)
    grads = any("G" in e.tree.leaves_used() for e in entries)
    setup = PruningSetup.from_spec(spec, grads=grads)
    evals = {d: setup.report_windows(d, args.eval_windows or None) for d in datasets}
    k = noise.window_sets if noise else 1
    ranges = {d: floor.split_windows(len(w), k, d) for d, w in evals.items()}
    context = context_of(args, setup.fingerprint, noise)
    out.mkdir(parents=True, exist_ok=True)  # only now: a bad model, data or split leaves no directory behind
    table = {"context": context, "rows": {}, "dense": {}}
    if table_path.is_file():
        previous = json.loads(table_path.read_text(encoding="utf-8"), parse_constant=_non_finite)
        if previous.get("context") == context:
            table = previous
    for other in args.reuse or []:
        reuse_rows(table, other)
    table["provenance"] = provenance()
    history = table.setdefault("history", [])  # every command that added to this table
    if table["provenance"]["command"] not in history:
        history.append(table["provenance"]["command"])
    # several invocations may fill one table (e.g. all datasets at 50%, WikiText-2 only elsewhere):
    # the layout and the metric list are the union, in order of first appearance
    layout = table.setdefault("layout", {"settings": [], "modes": [], "datasets": []})
    for key, values in (("settings", settings), ("modes", modes), ("datasets", datasets),
                        *((("seeds", noise.seeds),) if noise else ())):
        layout.setdefault(key, [])
        layout[key] += [v for v in values if v not in layout[key]]
    table["metrics"] = {**table.get("metrics", {}), **{e.label: describe(e.tree) for e in entries}}

    for d, w in evals.items():
        if d not in table["dense"]:
            table["dense"][d] = cached_dense_perplexity(setup, d, w)
    if zero_shot is not None:
        dense_accuracy(table, zero_shot, setup, table_path)
    seeds = noise.seeds if noise else (spec.seed,)
    jobs = [(seed, e, s, m) for seed in seeds for e in entries for s in settings for m in modes]
    setup = measure(table, jobs, setup, spec, grads, evals, ranges, noise is not None,
                    save=lambda: write_json_atomic(table_path, table), zero_shot=zero_shot)
    setup.dense.restore()
    table["windows"] = {d: len(w) for d, w in evals.items()}
    every = [Entry(label, resolve_metric(d["functional"])) for label, d in table["metrics"].items()]
    shown = (every, layout["settings"], layout["modes"], layout["datasets"])
    if noise is not None:
        table["noise"] = floor.summarise(table, *shown, layout["seeds"], k, reference)
        write_json_atomic(table_path, table)
        (out / f"{name}.md").write_text(floor.markdown(table, table["noise"]), encoding="utf-8")
        floor.plot_relative(table["noise"], out / f"{name}-relative.png")
        return table
    write_json_atomic(table_path, table)
    shown = (one_row_per_formula(every), *shown[1:])
    (out / f"{name}.md").write_text(markdown(table, *shown), encoding="utf-8")
    plot(table, *shown, out / f"{name}.png")
    return table


def dense_accuracy(table: dict, zero_shot: ZeroShot, setup: PruningSetup, table_path: Path) -> None:
    """The table's zero-shot settings and the dense model's accuracy (on the session's model, dense
    before any row prunes it); a table measured with other settings is refused, not mixed."""
    fresh = zero_shot_report(zero_shot, {})
    held = table.get("zero_shot")
    if held is not None and any(held[k] != fresh[k] for k in ZERO_SHOT_IDENTITY):
        raise MetricGPError(f"{table_path} holds zero-shot accuracy measured with other settings "
                            f"({', '.join(f'{k} {held[k]}' for k in ZERO_SHOT_IDENTITY)}); give the same "
                            "--zero-shot and --zero-shot-limit, or another --out or --name")
    if held is None or "dense" not in held["models"]:
        setup.dense.restore()
        dense = zero_shot.evaluate(setup.model, setup.tokenizer)
        table["zero_shot"] = zero_shot_report(zero_shot, {"dense": dense})


def one_row_per_formula(entries: list[Entry]) -> list[Entry]:
    """Entries whose formulas are the same (cells are keyed by formula) shown once, under every label
    joined by ' = ' (a table filled by several invocations may name one formula twice)."""
    merged: dict[str, Entry] = {}
    for e in entries:
        key = to_functional(e.tree)
        merged[key] = Entry(f"{merged[key].label} = {e.label}", e.tree) if key in merged else e
    return list(merged.values())


def measure(table: dict, jobs: list, setup: PruningSetup, spec: EvaluatorSpec, grads: bool, evals: dict,
            ranges: dict, per_seed: bool, save: Callable[[], None], zero_shot: ZeroShot | None = None) -> PruningSetup:
    """Prune for each (seed, entry, setting, mode) job that has an unmeasured cell and fill its row(s):
    when `per_seed`, one row per window set (`ranges[dataset]`: [start, end) of each set), keyed by
    seed and set; else the classic row over all windows (one range), with its zero-shot accuracy
    when `zero_shot` is given (a cell, too: a row without it is pruned again). `save()` after every
    job. Loads another seed's statistics when the jobs reach it; returns the setup in use at the end."""


    k = len(next(iter(ranges.values())))  # window sets: the same number for every dataset
    bar = tqdm(jobs, desc="compare", unit="row")
    for seed, entry, setting, mode in bar:
        base = row_key(to_functional(entry.tree), setting, mode)
        keys = [floor.set_key(base, seed, j, k) for j in range(k)] if per_seed else [base]
        missing = [[d for d in evals if d not in table["rows"].get(key, {}).get("perplexity", {})] for key in keys]
        accuracy = zero_shot is not None and "zero_shot" not in table["rows"].get(base, {})
        if not any(missing) and not accuracy:
            continue
        if setup.spec.seed != seed:
            setup = None  # drop this reference to the previous seed's model and statistics first
            setup = PruningSetup.from_spec(replace(spec, seed=seed), grads=grads)
        bar.set_postfix_str(f"{entry.label} {setting_label(setting)} {mode}" + (f" seed {seed}" if per_seed else ""))
        t0 = time.perf_counter()
        report = setup.prune(entry.tree, parse_setting(setting), mode)
        shared = (time.perf_counter() - t0) / len(keys)  # the prune's time, split over its rows
        for j, (key, todo) in enumerate(zip(keys, missing, strict=True)):
            t1 = time.perf_counter()
            row = table["rows"].get(key, {})
            ppl = dict(row.get("perplexity", {}))
            ppl.update({d: perplexity(setup.model, evals[d][slice(*ranges[d][j])]) for d in todo})
            cell = {"label": entry.label, "formula": to_functional(entry.tree), "setting": setting, "mode": mode}
            if per_seed:
                windows = {**row.get("windows", {}), **{d: list(ranges[d][j]) for d in todo}}
                cell.update(seed=seed, window_set=f"{j + 1}/{k}", windows=windows)
            table["rows"][key] = {**row, **cell, "sparsity": report.sparsity, "perplexity": ppl,
                                  "seconds": round(shared + time.perf_counter() - t1, 1)}
        if accuracy:  # never per_seed (refused with --zero-shot): one key, the base
            result = zero_shot.evaluate(setup.model, setup.tokenizer)
            table["rows"][base]["zero_shot"] = {k: result[k] for k in ("tasks", "mean", "seconds")}
        save()
    return setup


def reuse_rows(table: dict, path: Path) -> int:
    """Copy finished rows (and dense values) from another table made under the same context."""
    if not path.is_file():
        raise MetricGPError(f"--reuse: {path} not found")
    other = json.loads(path.read_text(encoding="utf-8"), parse_constant=_non_finite)
    if other.get("context") != table["context"]:
        raise MetricGPError(f"--reuse: {path} was made with other settings: {other.get('context')}")
    copied = 0
    for key, row in other["rows"].items():
        mine = table["rows"].setdefault(key, {**row, "perplexity": {}})
        for d, v in row["perplexity"].items():
            if d not in mine["perplexity"]:
                mine["perplexity"][d] = v
                copied += 1
    for d, v in other.get("dense", {}).items():
        table["dense"].setdefault(d, v)
    return copied


def _non_finite(name: str) -> float:
    """Tables written before JSON was kept strict may hold Infinity/NaN: read them as inf."""
    return math.inf


def _cell(table: dict, entry: Entry, setting: str, mode: str, dataset: str) -> float | None:
    """The row's perplexity on `dataset`; None if not measured; inf if measured non-finite (JSON null)."""
    row = table["rows"].get(row_key(to_functional(entry.tree), setting, mode))
    if row is None or dataset not in row["perplexity"]:
        return None
    value = row["perplexity"][dataset]
    return math.inf if value is None else float(value)


def _filled_columns(table: dict, entries: list[Entry], settings: list[str], modes: list[str],
                    dataset: str) -> list[tuple[str, str]]:
    """The (setting, mode) columns with at least one value for `dataset`."""
    return [(s, m) for s in settings for m in modes
            if any(_cell(table, e, s, m, dataset) is not None for e in entries)]


def markdown(table: dict, entries: list[Entry], settings: list[str], modes: list[str], datasets: list[str]) -> str:
    ctx = table["context"]
    lines = [
        "# Test perplexity of pruned models",
        "",
        f"Model `{ctx['model']}` (weights {ctx['fingerprint']}), dtype {ctx['dtype']}; calibration "
        f"{ctx['n_calib']} x {ctx['seqlen']}-token windows of `{ctx['calib']}` (seed {ctx['seed']}); "
        f"evaluation on the first {ctx['eval_windows'] or 'all'} {ctx['seqlen']}-token windows of each test split. "
        "Lower is better; the best pruned value in each column is in bold.",
        "",
        f"Made by (git {table['provenance']['git']}):",
        "",
        *[f"    {command}" for command in table.get("history", [table["provenance"]["command"]])],
        "",
    ]
    if any(e.label.startswith("evolved") for e in entries):
        lines += ["`evolved #k` is rank k of the search run's hall of fame (ranked on validation fitness); "
                  "hall-of-fame formulas equivalent to a built-in are listed under the built-in's name.", ""]
    for dataset in datasets:
        columns = _filled_columns(table, entries, settings, modes, dataset)
        lines += [f"## {dataset} (test)", "",
                  "| metric | " + " | ".join(f"{setting_label(s)} {m}" for s, m in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        best = {}
        for col in columns:
            values = [v for e in entries if (v := _cell(table, e, *col, dataset)) is not None]
            best[col] = min(values) if values else None
        dense = table["dense"].get(dataset)
        lines.append("| dense | " + " | ".join(f"{dense:.2f}" if dense is not None else "-" for _ in columns) + " |")
        for e in entries:
            cells = []
            for col in columns:
                v = _cell(table, e, *col, dataset)
                cells.append("-" if v is None else (f"**{v:.2f}**" if v == best[col] else f"{v:.2f}"))
            lines.append(f"| {e.label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += zero_shot_section(table, entries, settings, modes)
    lines += ["## Formulas", "", "| metric | formula (infix) |", "|---|---|"]
    lines += [f"| {e.label} | `{describe(e.tree)['infix']}` |" for e in entries]
    return "\n".join(lines) + "\n"


def zero_shot_section(table: dict, entries: list[Entry], settings: list[str], modes: list[str]) -> list[str]:
    """The zero-shot table: the dense model, then every measured (metric, setting, mode) row."""
    if "zero_shot" not in table:
        return []
    models = dict(table["zero_shot"]["models"])
    for e in entries:
        for s in settings:
            for m in modes:
                row = table["rows"].get(row_key(to_functional(e.tree), s, m), {})
                if "zero_shot" in row:
                    models[f"{e.label} {setting_label(s)} {m}"] = row["zero_shot"]
    return ["## Zero-shot accuracy", "", *table_lines({**table["zero_shot"], "models": models}), ""]


def plot(table: dict, entries: list[Entry], settings: list[str], modes: list[str], datasets: list[str],
         path: Path) -> None:
    """Grouped bars: one panel (row) per dataset, one group per setting/mode, one bar per metric (log)."""

    plt = pyplot()
    widest = max(len(_filled_columns(table, entries, settings, modes, d)) for d in datasets)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(max(6.0, 1.4 * widest), 3.8 * len(datasets)),
                             squeeze=False)
    width = 0.8 / max(len(entries), 1)
    for ax, dataset in zip(axes[:, 0], datasets, strict=True):
        columns = _filled_columns(table, entries, settings, modes, dataset)
        for i, e in enumerate(entries):
            xs, ys = [], []
            for j, col in enumerate(columns):
                v = _cell(table, e, *col, dataset)
                if v is not None and math.isfinite(v):
                    xs.append(j + i * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=e.label)
        dense = table["dense"].get(dataset)
        if dense:
            ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))])
        ax.set_xticklabels([f"{setting_label(s)}\n{m}" for s, m in columns], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("test perplexity (log)")
        ax.set_title(f"{dataset} test")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = floor.parse_args(build_parser(), argv)
    table = run(args)
    out, name = output_of(args)
    if "noise" not in table:
        print(f"{len(table['rows'])} rows -> {out}/{name}.md, {name}.json, {name}.png")
        return 0
    print(f"{len(table['rows'])} rows -> {out}/{name}.md, {name}.json, {name}-relative.png")
    print("\n".join(line.removeprefix("- ") for line in floor.verdict_lines(table["noise"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
