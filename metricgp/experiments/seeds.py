"""The seed-to-seed spread of structured-pruning claims: `experiments seeds`.

    python -m metricgp.structured.experiments seeds --calib-seeds 0,1,2 --keeps 0.7 --recover-tokens 0 \\
        --methods evolved,evolved-refit,wanda,wanda-refit --pairs evolved-refit:evolved,evolved:wanda \\
        --reuse results/structured/table.json --out results/structured-seeds

Each calibration seed draws another calibration sample (other statistics, other importances, other
Hessians) and gets its own `table` run in `<out>/seed<S>/` (resumable row by row). `--reuse`
fills a seed's table from an existing `table.json` made with that calibration seed and the same
test windows, so seed 0 need not be pruned again. The report `<out>/seeds.md` gives every method's
test perplexity as mean ± std over seeds, and for each `--pairs A:B` the paired difference
100 x (ppl(A) / ppl(B) - 1), same seed and windows, judged by the noise rule of the unstructured
report (`metricgp.experiments.noise.RULE`, with the whole window set as the only set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metricgp.errors import MetricGPError
from metricgp.experiments.noise import RULE, parse_seeds, relative, spread, verdict
from metricgp.experiments.rows import save_rows
from metricgp.experiments.table import run_table
from metricgp.provenance import command_line, write_json_atomic

STAGES = ("oneshot", "recovered")  # the table's perplexity columns, before and after recovery


def parse_pairs(text: str | None, methods: list[str]) -> list[tuple[str, str]]:
    """'a:b,c:d' -> [(a, b), (c, d)], both sides among `methods`; by default every `X-refit` against `X`."""
    if not text:
        return [(m, m.removesuffix("-refit")) for m in methods
                if m.endswith("-refit") and m.removesuffix("-refit") in methods]
    pairs = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        a, sep, b = item.partition(":")
        if not sep or a not in methods or b not in methods or a == b:
            raise MetricGPError(f"--pairs: '{item}' must be A:B with two different methods from --methods")
        pairs.append((a, b))
    return pairs


def seed_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "calib_seed": seed, "out": args.out / f"seed{seed}"})


def reuse_table(source: Path, target: Path, methods: list[str], keeps: list[float], eval_windows: int,
                seqlen: int) -> int:
    """Copy the rows of `methods` x `keeps` from `source` into the empty table `target`; the source
    must have been made with the same test windows. Returns how many rows were copied."""
    if not source.is_file():
        raise MetricGPError(f"--reuse: {source} not found")
    table = json.loads(source.read_text())
    if table.get("eval_windows") != eval_windows or table.get("seqlen") != seqlen:
        raise MetricGPError(f"--reuse: {source} was made with other test windows "
                            f"({table.get('eval_windows')} x {table.get('seqlen')}, not {eval_windows} x {seqlen})")
    rows = {k: v for k, v in table["rows"].items() if v["method"] in methods and v["keep"] in keeps}

    meta = {k: v for k, v in table.items() if k != "rows"} | {"reused_from": str(source)}
    save_rows(target, rows, meta)
    return len(rows)


def run_seeds(args: argparse.Namespace) -> None:
    seeds = parse_seeds(args.calib_seeds)
    pairs = parse_pairs(args.pairs, args.methods)
    for seed in seeds:
        one = seed_args(args, seed)
        path = one.out / "table.json"
        if args.reuse is not None and seed == args.reuse_seed and not path.is_file():
            n = reuse_table(args.reuse, path, args.methods, args.keeps, args.eval_windows, args.seqlen)
            print(f"seed {seed}: {n} rows from {args.reuse}", flush=True)
        run_table(one)
    tables = {s: json.loads((args.out / f"seed{s}" / "table.json").read_text()) for s in seeds}
    summary = summarise(tables, args.methods, args.keeps, pairs)

    summary["command"] = command_line()
    write_json_atomic(args.out / "seeds.json", summary)
    (args.out / "seeds.md").write_text(markdown(summary), encoding="utf-8")
    print(f"-> {args.out / 'seeds.md'}")


def summarise(tables: dict[int, dict], methods: list[str], keeps: list[float],
              pairs: list[tuple[str, str]]) -> dict:
    """Per (keep, stage, dataset): each method's spread over seeds and each pair's paired difference."""

    seeds = sorted(tables)
    groups = []
    for keep in keeps:
        for stage in STAGES:
            values: dict[str, dict[str, dict[int, float]]] = {}
            for seed in seeds:
                for method in methods:
                    row = tables[seed]["rows"].get(f"{method}|{keep}", {})
                    for dataset, ppl in (row.get(stage) or {}).items():
                        values.setdefault(dataset, {}).setdefault(method, {})[seed] = ppl
            for dataset, by_method in values.items():
                cells = {m: {"seeds": sorted(v), **spread([v[s] for s in sorted(v)])} for m, v in by_method.items()}
                compared = []
                for a, b in pairs:
                    common = sorted(set(by_method.get(a, {})) & set(by_method.get(b, {})))
                    if not common:
                        continue
                    diff = spread([relative(by_method[a][s], by_method[b][s]) for s in common])
                    compared.append({"a": a, "b": b, "seeds": common, **diff,
                                     "verdict": verdict(diff, [diff["mean"]], len(common))})
                groups.append({"keep": keep, "stage": stage, "dataset": dataset, "methods": cells,
                               "pairs": compared})
    return {"seeds": seeds, "rule": RULE, "groups": groups,
            "settings": {s: {k: tables[s].get(k) for k in ("eval_windows", "seqlen", "recover_tokens", "commands",
                                                           "reused_from")} for s in seeds}}


def _pm(cell: dict, digits: int = 2, sign: str = "") -> str:
    std = "" if cell["std"] is None else f" ± {cell['std']:.{digits}f}"
    return f"{cell['mean']:{sign}.{digits}f}{std}"


def markdown(summary: dict) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = ["# Structured pruning over calibration seeds", "",
             f"Calibration seeds {seeds}: each draws its own calibration sample, so its own statistics, structure "
             "importances and Hessians. Test perplexity as mean ± std (sample std) over seeds on the same test "
             "windows. A pair A vs B is the paired difference 100 x (ppl(A) / ppl(B) - 1) per seed, in percent "
             f"(negative: A is better). **Rule:** {summary['rule']} (one window set here).", "",
             f"Made by: `{summary.get('command', '')}`", ""]
    for seed, s in summary["settings"].items():
        source = f", rows from `{s['reused_from']}`" if s.get("reused_from") else ""
        lines.append(f"- seed {seed}: {s['eval_windows']} test windows x {s['seqlen']} tokens{source}")
    lines.append("")
    for g in summary["groups"]:
        lines += [f"## {g['keep']:.0%} kept, {g['stage']}, {g['dataset']} (test)", "",
                  "| method | seeds | perplexity | per seed |", "|---|---|---:|---|"]
        for name, c in sorted(g["methods"].items(), key=lambda kv: kv[1]["mean"]):
            per = ", ".join(f"{v:.2f}" for v in c["per_seed"])
            lines.append(f"| {name} | {len(c['seeds'])} | {_pm(c)} | {per} |")
        if g["pairs"]:
            lines += ["", "| A vs B | seeds | Δ % | per seed | verdict |", "|---|---|---:|---|---|"]
            for p in g["pairs"]:
                per = ", ".join(f"{v:+.1f}" for v in p["per_seed"])
                lines.append(f"| {p['a']} vs {p['b']} | {len(p['seeds'])} | {_pm(p, 1, '+')} | {per} | "
                             f"{p['verdict']} |")
        lines.append("")
    return "\n".join(lines)
