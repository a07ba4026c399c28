"""What a run writes to its directory besides the checkpoint.

- config.json: resolved configuration, seed, command line, git SHA, versions;
- log.jsonl: one JSON record per generation (append-only; rewritten from the checkpoint's records
  on resume, so a generation interrupted between log and checkpoint is not logged twice);
- hall_of_fame.json: the best distinct formulas in every printed form, fitness per fidelity;
- best.json: the best formula (`formula` is what `apply --metric-file` reads);
- fitness.png, size_diversity.png, fitness_vs_size.png; README.md: a short summary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metricgp.evaluate import EvaluatorSpec
from metricgp.expr.parse import parse
from metricgp.expr.simplify import describe
from metricgp.fileio import atomic_path
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import dumps, write_json_atomic
from metricgp.search.staged import FitnessCache

LOG = "log.jsonl"

write_json = write_json_atomic  # strict JSON: inf/nan -> null


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / LOG, "a", encoding="utf-8") as fh:
        fh.write(dumps(record, indent=None) + "\n")


def rewrite_log(run_dir: Path, records: Sequence[dict[str, Any]]) -> None:
    path = Path(run_dir) / LOG
    with atomic_path(path) as tmp:
        tmp.write_text("".join(dumps(r, indent=None) + "\n" for r in records), encoding="utf-8")


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def hall_of_fame_entries(hof: Sequence[Any], cache: FitnessCache, fidelities: Sequence[int]) -> list[dict]:
    out = []
    for rank, ind in enumerate(hof, 1):
        stage, value = ind.fitness.values
        per = cache.results.get(ind.key, {})
        out.append({
            "rank": rank,
            **describe(ind.node),
            "fitness": value,
            "fidelity": fidelities[int(stage)] if stage >= 0 else None,
            "fitness_by_fidelity": {str(n): per[n][0] for n in fidelities if n in per},
            "canonical_key": ind.key,
        })
    return out


def write_results(run_dir: Path, run_name: str, hof: Sequence[Any], cache: FitnessCache,
                  fidelities: Sequence[int], gen: int) -> None:
    entries = hall_of_fame_entries(hof, cache, fidelities)
    write_json(Path(run_dir) / "hall_of_fame.json", {"run": run_name, "generation": gen,
                                                     "fidelities": list(fidelities), "entries": entries})
    if entries:
        best = entries[0]
        write_json(Path(run_dir) / "best.json", {
            "formula": best["functional"], "infix": best["infix"], "latex": best["latex"],
            "sympy": best["sympy"], "fitness": best["fitness"], "fidelity": best["fidelity"],
            "fitness_by_fidelity": best["fitness_by_fidelity"], "size": best["size"],
            "run": run_name, "generation": gen,
        })


def write_plots(run_dir: Path, records: Sequence[dict[str, Any]], cache: FitnessCache,
                fidelities: Sequence[int]) -> list[Path]:
    """Three PNGs (matplotlib, Agg backend)."""

    plt = pyplot()
    run_dir = Path(run_dir)
    gens = [r["gen"] for r in records]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = (("best_fitness", "best (highest fidelity)"), ("median_fitness", "median, top fidelity"),
              ("median_fitness_f0", f"median, {fidelities[0]} windows"))
    for key, label in curves:
        ys = [r.get(key) for r in records]
        ax.plot(gens, [math.nan if y is None else y for y in ys], marker=".", label=label)
    names = reference_names(records)
    for name in names:
        ys = [r.get("references", {}).get(name, math.nan) for r in records]
        ax.plot(gens, ys, linestyle="--", label=f"{name} (same windows as best)")
    # log scale: random initial trees sit orders of magnitude above the refined ones
    ax.set(xlabel="generation", ylabel="fitness (lower is better, log scale)", yscale="log",
           title="Fitness over generations")
    ax.legend()
    written.append(save_figure(fig, run_dir / "fitness.png"))

    if names:  # the log-scale plot above cannot show a gap of a few percent
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(gens, [r.get("best_fitness") or math.nan for r in records], marker=".", label="best so far")
        for name in names:
            ax.plot(gens, [r.get("references", {}).get(name, math.nan) for r in records], linestyle="--",
                    label=name)
        finite = [v for r in records for v in [r.get("best_fitness"), *r.get("references", {}).values()]
                  if v is not None and math.isfinite(v)]
        top = sorted(finite)[min(len(finite) - 1, max(3, len(finite) // 2))] if finite else None
        ax.set(xlabel="generation", ylabel="fitness on the best's windows (lower is better)",
               title="Best so far against the reference metrics", ylim=(None, top * 1.05 if top else None))
        ax.legend()
        written.append(save_figure(fig, run_dir / "references.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(gens, [r["size_mean"] for r in records], label="mean size")
    ax.fill_between(gens, [r["size_min"] for r in records], [r["size_max"] for r in records], alpha=0.2)
    ax.set(xlabel="generation", ylabel="tree size (nodes)")
    ax2 = ax.twinx()
    ax2.plot(gens, [r["diversity"] for r in records], color="tab:orange", label="diversity")
    ax2.set(ylabel="unique canonical forms / population", ylim=(0, 1.05))
    ax.set_title("Tree size and diversity")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower left")
    written.append(save_figure(fig, run_dir / "size_diversity.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in fidelities:
        pts = [(size, per[n][0]) for key, (_, size) in cache.forms.items()
               if (per := cache.results.get(key, {})) and n in per and math.isfinite(per[n][0])
               and max(per) == n]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=10, alpha=0.6, label=f"stopped at {n} windows")
    ax.set(xlabel="tree size (nodes)", ylabel="fitness at the fidelity reached", yscale="log",
           title="Fitness vs size, every evaluated formula")
    ax.legend()
    written.append(save_figure(fig, run_dir / "fitness_vs_size.png"))
    return written


def write_summary(run_dir: Path, run_name: str, records: Sequence[dict[str, Any]], hof_entries: list[dict],
                  counters: dict[str, int], stopped: str) -> None:
    last = records[-1] if records else {}
    config_path = Path(run_dir) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    run_config = config.get("config", {})
    seconds = sum(r.get("seconds", 0.0) for r in records)
    lines = [f"# Metric search `{run_name}`", ""]
    if config:
        lines += [f"Made by `{config.get('command', '?')}` (git {config.get('git')}, GP seed {config.get('seed')}), "
                  f"search space `{run_config['space'].get('source')}`.", ""]
    if run_config.get("evaluator") == "model":

        spec = {**EvaluatorSpec().to_dict(), **run_config.get("evaluator_spec", {})}  # what the evaluator used
        lines += [f"Fitness: {spec['fitness']} on the first N {spec['seqlen']}-token windows of "
                  f"`{spec['valid']}` validation text, model `{spec['model']}` pruned one-shot "
                  f"({spec['pattern']}, sparsity {spec['sparsity']:g}) with statistics from "
                  f"{spec['n_calib']} `{spec['calib']}` windows (calibration seed {spec['seed']}); "
                  f"N races through {config.get('fidelities')}. "
                  "Test-split numbers are in report.md (made afterwards by `python -m metricgp.compare --run`).", ""]
    if run_config.get("evaluator") == "refit":
        spec = run_config.get("evaluator_spec", {})
        lines += [f"Fitness: output residual after the least-squares refit (reconstruct mode's), geometric mean "
                  f"over every linear layer of N decoder blocks spread over depth (32 sampled rows each), "
                  f"{spec.get('pattern')} at sparsity {spec.get('sparsity')}, input Hessians from "
                  f"{spec.get('n_calib')} `{spec.get('calib')}` windows; N races through "
                  f"{config.get('fidelities')}. See metricgp/refit_fitness.py.", ""]
    if run_config.get("evaluator") == "structured":
        spec = run_config.get("evaluator_spec", {})
        st = spec.get("structured", {})
        lines += [f"Fitness: {spec.get('fitness', 'ppl')} on validation windows of `{spec.get('valid')}`, model "
                  f"`{spec.get('model')}` with the heads and MLP channels the metric ranks lowest removed "
                  f"(structured, {st.get('keep')} of decoder parameters kept; evaluator options {st}); "
                  f"N races through {config.get('fidelities')}. Simplification scope: global.", ""]
    lines += [f"Stopped: {stopped}. Generations: {last.get('gen', 0)} in {seconds / 60:.1f} min "
             "(search time, not counting the model and statistics load). "
             f"Evaluations: {counters.get('evaluations', 0)} ({counters.get('windows', 0)} windows). "
             f"Saved by OOS/cache: {counters.get('cache_hits', 0)} cache hits, "
             f"{counters.get('oos_regenerated', 0)} children regenerated, "
             f"{counters.get('degenerate', 0)} degenerate.", "",
             "| rank | formula | fitness | windows | size |", "|---|---|---|---|---|"]
    for e in hof_entries[:10]:
        fit = "inf" if e["fitness"] is None or not math.isfinite(e["fitness"]) else f"{e['fitness']:.6g}"
        lines.append(f"| {e['rank']} | `{e['infix']}` | {fit} | {e['fidelity']} | {e['size']} |")
    lines += reference_lines(records)
    plots = "fitness.png, references.png, " if reference_names(records) else "fitness.png, "
    lines += ["", f"Plots: {plots}size_diversity.png, fitness_vs_size.png. "
              "Per-generation log: log.jsonl. Best formula: best.json.", ""]
    (Path(run_dir) / "README.md").write_text("\n".join(lines), encoding="utf-8")


def reference_names(records: Sequence[dict[str, Any]]) -> list[str]:
    """The reference metrics a run's log records, in first-seen order."""
    return list(dict.fromkeys(n for r in records for n in r.get("references", {})))


def reference_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Generation by generation (where the best changed), the best fitness against the reference
    metrics on the same windows, with the evaluations spent so far; empty without references."""
    names = reference_names(records)
    if not names:
        return []
    lines = ["", "Best so far against the reference metrics, scored on the same validation windows as the best "
             "(lower is better; a generation is listed when the best changed):", "",
             "| gen | evaluations so far | best | windows | " + " | ".join(names) + " | best formula |",
             "|---" * (5 + len(names)) + "|"]
    spent, previous, reached = 0, None, {}
    for i, r in enumerate(records):
        spent += sum(r.get("evaluations_per_fidelity", {}).values())
        refs, best = r.get("references", {}), r.get("best_fitness")
        for name in names:
            if best is not None and name in refs and best <= refs[name] and name not in reached:
                reached[name] = (r["gen"], spent)
        key = (best, r.get("best_fidelity"))
        if best is not None and (key != previous or i == len(records) - 1):
            cells = [f"{refs[n]:.4g}" if n in refs else "-" for n in names]
            lines.append(f"| {r['gen']} | {spent} | {best:.4g} | {r.get('best_fidelity')} | "
                         + " | ".join(cells) + f" | `{r.get('best_formula')}` |")
        previous = key
    lines.append("")
    for name in names:
        lines.append(f"- {name}: " + (f"matched or beaten at generation {reached[name][0]}, after "
                                      f"{reached[name][1]} evaluations." if name in reached else
                                      "not reached in this run."))
    return lines


def load_best(path: Path):
    """The best formula of a run directory (or a best.json path) as a `Node`."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.json"
    return parse(json.loads(path.read_text(encoding="utf-8"))["formula"])
