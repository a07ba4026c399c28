"""Side by side level-search runs: with and without the metric prior, with and without in-loop training.

    python -m metricgp.darwin.compare results/darwin-k60 results/darwin-k60-noprior \\
        results/darwin-k60-trained --out results/darwin

Reads each run's config.json, log.jsonl and report.json (nothing is recomputed) and writes
compare.md, compare.json and fitness-vs-time.png into --out:

- per run: prior, in-loop training, generations, seconds, start and final fitness, the Spearman of
  the prior's predicted loss against first-stage fitness, and the final model's test perplexity;
- time to a fitness: for every run's final fitness as a target, the first generation (and the
  cumulative seconds) at which each other run with the same selection schedule reached it.
  Runs with in-loop training score *trained* candidates, so their fitness is only compared with
  runs of the same schedule; across schedules the comparison is the final model after the same
  recovery;
- how different the winners are: genes at different levels and the summed level distance;
- each final model against the first run's, after the same recovery: the difference in percent per
  test set, and on how many test sets it is lower (one search seed each: no spread is known).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from metricgp.errors import MetricGPError
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import provenance, write_json_atomic


def load_run(path: Path) -> dict[str, Any]:
    path = Path(path)
    files = {name: path / name for name in ("config.json", "log.jsonl")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise MetricGPError(f"{path} is not a level-search run (missing {', '.join(missing)})")
    config = json.loads(files["config.json"].read_text(encoding="utf-8"))
    records = [json.loads(line) for line in files["log.jsonl"].read_text(encoding="utf-8").splitlines() if line]
    report_file = path / "report.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    return {"name": path.name, "path": str(path), "config": config["config"], "records": records, "report": report}


def schedule_key(run: dict[str, Any]) -> str:
    return json.dumps(run["config"]["stages"], sort_keys=True)


def trajectory(run: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(generation, cumulative seconds, parent fitness) after each generation."""
    out, elapsed = [], 0.0
    for r in run["records"]:
        elapsed += r.get("seconds", 0.0)
        out.append((r["gen"], elapsed, r["fitness"]))
    return out


def time_to(run: dict[str, Any], target: float) -> tuple[int, float] | None:
    """First (generation, seconds) at which the run's parent fitness is at or below `target`."""
    for gen, seconds, fitness in trajectory(run):
        if fitness <= target * (1 + 1e-12):
            return gen, seconds
    return None


def summary(run: dict[str, Any]) -> dict[str, Any]:
    c, traj, report = run["config"], trajectory(run), run["report"]
    return {"run": run["name"], "prior": c["prior"], "train_tokens": [s.get("train_tokens", 0) for s in c["stages"]],
            "screen": c.get("screen"), "offspring": c.get("offspring"),
            "generations": traj[-1][0], "seconds": round(traj[-1][1], 1), "start_fitness": traj[0][2],
            "final_fitness": traj[-1][2], "spearman": report.get("spearman_predicted_vs_first_stage_all"),
            "perplexity": report.get("perplexity", {}), "genome": report.get("genome") or run["records"][-1]["genome"]}


def reach_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for target_run in runs:
        target = trajectory(target_run)[-1][2]
        peers = [r for r in runs if schedule_key(r) == schedule_key(target_run)]
        reached = {r["name"]: time_to(r, target) for r in peers}
        rows.append({"target": target, "target_of": target_run["name"],
                     "reached": {k: (None if v is None else {"generation": v[0], "seconds": round(v[1], 1)})
                                 for k, v in reached.items()}})
    return rows


def against_reference(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every other run's final models (pruned, recovered) against the first run's of the same kind:
    100 x (ppl / reference ppl - 1) per test set, and how many test sets are lower."""
    ref = summaries[0]
    rows = []
    for s in summaries[1:]:
        for kind, row in s["perplexity"].items():
            base = ref["perplexity"].get(kind)
            if kind == "dense" or not row or not base:
                continue
            delta = {d: 100.0 * (v / base[d] - 1.0) for d, v in row.items() if d in base and v and base[d]}
            if delta:
                rows.append({"run": s["run"], "reference": ref["run"], "model": kind, "delta_percent": delta,
                             "lower": sum(v < 0 for v in delta.values()), "of": len(delta)})
    return rows


def _screened(s: dict[str, Any]) -> str:
    if not s["prior"] or not s.get("screen") or not s.get("offspring"):
        return "all"
    return f"{s['screen']} of {s['offspring']}"


def genome_distance(a: list[int], b: list[int]) -> dict[str, int]:
    return {"genes_differ": sum(x != y for x, y in zip(a, b, strict=True)),
            "level_distance": sum(abs(x - y) for x, y in zip(a, b, strict=True))}


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(summaries: list[dict[str, Any]], reach: list[dict[str, Any]], distances: dict[str, Any],
             command: str, versus: list[dict[str, Any]] | None = None) -> str:
    lines = ["# Level searches side by side", "", f"Made by: `{command}` (from each run's log.jsonl and report.json).",
             "", "| run | prior | offspring screened to the first stage | in-loop training tokens | generations "
             "| seconds | start fitness | final fitness | Spearman predicted vs first stage |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['run']} | {'on' if s['prior'] else 'off'} | {_screened(s)} | {s['train_tokens']} | "
                     f"{s['generations']} | "
                     f"{s['seconds']:.0f} | {s['start_fitness']:.4f} | {s['final_fitness']:.4f} | "
                     f"{_fmt(s['spearman'], '.3f')} |")
    ppl_rows = [(s["run"], kind, row) for s in summaries for kind, row in s["perplexity"].items()
                if kind != "dense" and row]
    dense = next((s["perplexity"]["dense"] for s in summaries if s["perplexity"].get("dense")), None)
    if ppl_rows:
        datasets = sorted({d for _, _, row in ppl_rows for d in row})
        dense_note = f" (dense: {', '.join(f'{d} {v:.2f}' for d, v in sorted(dense.items()))})" if dense else ""
        lines += ["", f"Final models, test perplexity{dense_note}:", "",
                  "| run | model | " + " | ".join(datasets) + " |", "|---|---" + "|---" * len(datasets) + "|"]
        lines += [f"| {run} | {kind} | " + " | ".join(_fmt(row.get(d), ".2f") for d in datasets) + " |"
                  for run, kind, row in ppl_rows]
    lines += ["", "Time to a fitness (runs with the same selection schedule; the first generation whose parent "
              "is at or below the target, and the cumulative search seconds at that point):", "",
              "| target (final of) | " + " | ".join(s["run"] for s in summaries) + " |",
              "|---" * (len(summaries) + 1) + "|"]
    for row in reach:
        cells = []
        for s in summaries:
            if s["run"] not in row["reached"]:
                cells.append("other schedule")
            else:
                hit = row["reached"][s["run"]]
                cells.append("not reached" if hit is None else f"gen {hit['generation']}, {hit['seconds']:.0f} s")
        lines.append(f"| {row['target']:.4f} ({row['target_of']}) | " + " | ".join(cells) + " |")
    if versus:
        lines += ["", f"Final models against {versus[0]['reference']}'s of the same kind, in percent (negative: "
                  "lower perplexity); one search seed per run, so no spread is known:", ""]
        lines += [f"- {v['run']} {v['model']}: " + ", ".join(f"{d} {x:+.1f}%" for d, x in sorted(
            v["delta_percent"].items())) + f"; lower on {v['lower']} of {v['of']}" for v in versus]
    if distances:
        lines += ["", "Winners compared (genes at a different level / summed level distance):", ""]
        lines += [f"- {pair}: {d['genes_differ']} genes differ, level distance {d['level_distance']}"
                  for pair, d in distances.items()]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        traj = trajectory(run)
        label = f"{run['name']} (prior {'on' if run['config']['prior'] else 'off'})"
        axes[0].plot([t[1] for t in traj], [t[2] for t in traj], drawstyle="steps-post", label=label)
        axes[1].plot([t[0] for t in traj], [t[2] for t in traj], drawstyle="steps-post", label=label)
    axes[0].set(xlabel="search seconds", ylabel="parent fitness (lower is better)", yscale="log")
    axes[1].set(xlabel="generation", yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Level search: fitness of the parent")
    save_figure(fig, path)


def compare(paths: list[Path], out: Path) -> dict[str, Any]:
    runs = [load_run(p) for p in paths]
    if len(runs) < 2:
        raise MetricGPError("give at least two runs to compare")
    summaries = [summary(r) for r in runs]
    reach = reach_table(runs)
    distances = {f"{a['run']} vs {b['run']}": genome_distance(a["genome"], b["genome"])
                 for i, a in enumerate(summaries) for b in summaries[i + 1:] if len(a["genome"]) == len(b["genome"])}
    meta = provenance()
    versus = against_reference(summaries)
    result = {"runs": summaries, "time_to_fitness": reach, "winner_distances": distances,
              "against_first_run": versus, **meta}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", result)
    text = markdown(summaries, reach, distances, meta.get("command", ""), versus)
    (out / "compare.md").write_text(text, encoding="utf-8")
    plot(runs, out / "fitness-vs-time.png")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.darwin.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="level-search run directories")
    p.add_argument("--out", type=Path, required=True, help="directory for compare.md/json and the plot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        compare(args.runs, args.out)
    except MetricGPError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
