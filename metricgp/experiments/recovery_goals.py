"""`python -m metricgp.experiments.recovery_goals`: where each family of pruned models stands against issue 22's
recovery goals, from every recovery table under a directory (results/recovery/**/results.json), into
goals.md, goals.json and goals.png there.

    python -m metricgp.experiments.recovery_goals results/recovery

A row counts at its last checkpoint (the model its whole budget made; choosing the best checkpoint would choose on
the test split). Rows measured under another protocol (test windows, window length, test data) than the first
table found are left out and named. Where a goal is not met, the gain of the best row's last doubling of tokens is
carried on to 1M tokens: a stated assumption, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from metricgp.errors import MetricGPError, cli_entry
from metricgp.experiments.recovery import NM24, PIPELINES, S70, U50, method_label, token_label
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import provenance, write_json_atomic

# the issue's goals: WikiText-2 test perplexity after at most 1M recovery tokens, as a multiple of dense
GOALS = {S70: 2.0, U50: 1.3, NM24: 1.6}
BUDGET = 1 << 20
DATA = "wikitext2"
PROTOCOL_KEYS = ("eval_windows", "seqlen", "dataset")


def collect(root: Path) -> tuple[dict, list[dict], list[str]]:
    """(the protocol, one entry per row of a family with a goal that has a test point, the tables left out and
    why)."""
    tables = sorted(root.rglob("results.json"))
    if not tables:
        raise MetricGPError(f"{root} holds no results.json")
    protocol, dense, entries, skipped = None, None, [], []
    for path in tables:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise MetricGPError(f"{path}: not readable JSON ({err})") from err
        if not isinstance(table, dict) or "rows" not in table or "protocol" not in table:
            skipped.append(f"{path.relative_to(root)}: not a recovery table")
            continue
        mine = {k: table["protocol"].get(k) for k in PROTOCOL_KEYS}
        if protocol is None:
            protocol, dense = mine, table.get("dense_ppl", {})
        elif mine != protocol:
            skipped.append(f"{path.relative_to(root)}: protocol {mine}, not {protocol}")
            continue
        where = "(top)" if path.parent == root else str(path.parent.relative_to(root))
        for row in table["rows"].values():
            pipeline = PIPELINES.get(row.get("pipeline"))
            points = [p for p in row.get("points", []) if DATA in p.get("test", {})]
            if pipeline is None or pipeline.family not in GOALS or not points:
                continue
            last = max(points, key=lambda p: p["tokens"])
            entries.append({
                "where": where, "family": pipeline.family,
                "pipeline": row["pipeline"], "loss": row["loss"], "method": method_label(row),
                "lr": row.get("lr"), "oneshot": row.get("oneshot", {}).get(DATA), "tokens": last["tokens"],
                "perplexity": last["test"][DATA], "finished": "final" in row,
                "curve": [(0, row.get("oneshot", {}).get(DATA))] + sorted((p["tokens"], p["test"][DATA])
                                                                          for p in points)})
    if protocol is None or DATA not in dense:
        raise MetricGPError(f"no recovery table under {root} has a dense {DATA} perplexity")
    for e in entries:
        e["x_dense"] = e["perplexity"] / dense[DATA]
    return {**protocol, "dense": dense[DATA]}, entries, skipped


def heading(entry: dict) -> float | None:
    """The perplexity at 1M tokens if every later doubling gained what the last one did (None: no doubling)."""
    curve = [(t, v) for t, v in entry["curve"] if t > 0]
    if len(curve) < 2 or curve[-2][0] * 2 != curve[-1][0]:
        return None
    gain = curve[-2][1] - curve[-1][1]
    return curve[-1][1] - gain * math.log2(BUDGET / curve[-1][0])


def summarise(root: Path) -> dict:
    protocol, entries, skipped = collect(root)
    families = []
    for family, goal in GOALS.items():
        rows = sorted((e for e in entries if e["family"] == family), key=lambda e: e["perplexity"])
        if not rows:
            continue
        best = rows[0]
        families.append({"family": family, "goal_x_dense": goal, "goal_perplexity": goal * protocol["dense"],
                         "met": best["x_dense"] <= goal, "best": best, "heading_at_1M": heading(best),
                         "rows": rows})
    return {"what": f"{DATA} test perplexity after recovery against the issue's goals (each row at its last "
                    "checkpoint)", "protocol": protocol, "families": families, "left_out": skipped,
            "provenance": provenance()}


def markdown(summary: dict) -> str:
    p = summary["protocol"]
    lines = ["# Recovery against the goals", "",
             f"WikiText-2 test perplexity on the first {p['eval_windows']} windows of {p['seqlen']} tokens (dense "
             f"{p['dense']:.2f}), each row at its last checkpoint, one run per row. Made by "
             f"`{summary['provenance']['command']}` from every results.json under this directory.", "",
             "| family | goal | best row | perplexity | x dense | tokens | met? | where |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for f in summary["families"]:
        b = f["best"]
        lines.append(f"| {f['family']} | {f['goal_x_dense']:g}x ({f['goal_perplexity']:.2f}) | {b['pipeline']}, "
                     f"{b['loss']}, {b['method']} | {b['perplexity']:.2f} | {b['x_dense']:.2f} | "
                     f"{token_label(b['tokens'])} | {'yes' if f['met'] else 'no'} | `{b['where']}` |")
    lines.append("")
    for f in summary["families"]:
        if not f["met"]:
            h = f["heading_at_1M"]
            lines.append(f"- {f['family']}: " + (
                "no doubling of tokens measured on the best row, so no heading." if h is None else
                f"carrying the best row's last doubling's gain on to 1M tokens (an assumption, not a measurement) "
                f"ends at {h:.2f}, {h / p['dense']:.2f}x dense, "
                + ("inside the goal." if h <= f["goal_perplexity"] else "outside the goal.")))
    lines += ["", "Every row:", "", "| family | pipeline | loss | method | lr | one-shot | tokens | perplexity | "
              "x dense | where |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for f in summary["families"]:
        for r in f["rows"]:
            lines.append(f"| {f['family']} | {r['pipeline']} | {r['loss']} | {r['method']} | "
                         f"{'' if r['lr'] is None else format(r['lr'], 'g')} | "
                         f"{'' if r['oneshot'] is None else format(r['oneshot'], '.2f')} | {token_label(r['tokens'])}"
                         f"{'' if r['finished'] else ' (running)'} | {r['perplexity']:.2f} | {r['x_dense']:.2f} | "
                         f"`{r['where']}` |")
    if summary["left_out"]:
        lines += ["", "Left out: " + "; ".join(summary["left_out"])]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    fams = summary["families"]
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.4), squeeze=False)
    dense = summary["protocol"]["dense"]
    for ax, f in zip(axes[0], fams, strict=True):
        for r in f["rows"]:
            pts = [(t, v) for t, v in r["curve"] if t > 0]
            if len(pts) > 1:
                ax.plot(*zip(*pts, strict=True), "-o", ms=3, lw=2.2 if r is f["best"] else 0.9,
                        label=f"{r['pipeline']} {r['loss']} {r['method']} ({r['where']})")
        ax.axhline(f["goal_perplexity"], color="red", ls="--", lw=0.9, label=f"goal {f['goal_x_dense']:g}x dense")
        ax.axhline(dense, color="black", lw=0.8, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("recovery tokens (log)")
        ax.set_ylabel(f"{DATA} test perplexity")
        ax.set_title(f["family"])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.experiments.recovery_goals",
                                description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, nargs="?", default=Path("results/recovery"),
                   help="directory searched for results.json (default results/recovery); goals.* are written there")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.root.is_dir():
        raise MetricGPError(f"{args.root} is not a directory")
    summary = summarise(args.root)
    write_json_atomic(args.root / "goals.json", summary)
    (args.root / "goals.md").write_text(markdown(summary), encoding="utf-8")
    plot(summary, args.root / "goals.png")
    print(f"{len(summary['families'])} families -> {args.root}/goals.md, goals.json, goals.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
