"""The noise floor of `python -m metricgp.compare`: calibration seeds x disjoint window sets.

With `--calib-seeds 0,1,2 --window-sets 2` every (metric, setting, mode) is pruned once per
calibration seed (each seed draws another calibration sample, hence other statistics) and its test
windows are cut into consecutive disjoint sets, measured separately. A row of the table is one
(metric, setting, mode, seed, window set) cell; this module turns such rows into

- per cell: mean and standard deviation over seeds of the perplexity, per window set and over all
  windows (the sets recombined: exp of the token-weighted mean NLL);
- per metric: the paired difference to the reference metric (same seed, same windows) in percent,
  and a verdict by `RULE`;
- the markdown table, the verdict lines and `<name>-relative.png`.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from metricgp.errors import MetricGPError
from metricgp.expr import to_functional
from metricgp.plotting import pyplot, save_figure
from metricgp.prune.patterns import parse_setting

SIGMAS = 2.0  # a difference must exceed SIGMAS standard deviations over seeds
CLIP_PERCENT = 100.0  # the relative plot writes, rather than draws, differences beyond this
RULE = (f"significant when |mean paired difference| > {SIGMAS:g} x its standard deviation over calibration seeds "
        "(sample std, n - 1) AND the mean paired difference has that same sign on every window set")


@dataclass(frozen=True)
class NoiseOptions:
    """What `--calib-seeds`, `--window-sets` and `--reference` asked for."""

    seeds: tuple[int, ...]
    window_sets: int
    reference: str


def add_noise_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("noise floor (see metricgp/experiments/noise.py)")
    g.add_argument("--calib-seeds", default=None, metavar="S,S,...",
                   help="repeat every cell for each of these calibration seeds (instead of --calib-seed)")
    g.add_argument("--window-sets", type=int, default=None, metavar="K",
                   help="cut the evaluated test windows into K disjoint consecutive sets, reported separately")
    g.add_argument("--reference", default=None, metavar="METRIC",
                   help="the metric the others are paired with (default wanda; needs one of the two above)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, except that `calib_seed` stays None unless --calib-seed is given (argparse
    sets no default for what the namespace already holds), so that `noise_options` can refuse it
    beside --calib-seeds; `noise_options` puts the default back."""
    return parser.parse_args(argv, namespace=argparse.Namespace(calib_seed=None))


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2): integers, at least one, no repeats."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        seeds = tuple(int(s) for s in items)
    except ValueError:
        raise MetricGPError(f"--calib-seeds must be comma-separated integers, got '{text}'") from None
    if not seeds:
        raise MetricGPError("--calib-seeds names no seed")
    if len(set(seeds)) != len(seeds):
        raise MetricGPError(f"--calib-seeds repeats a seed: '{text}'")
    return seeds


def noise_options(args: argparse.Namespace) -> NoiseOptions | None:
    """The validated noise options, or None for the classic single-seed table. `args` come from
    `parse_args` (with a plain parse, the default --calib-seed 0 counts as given). Leaves
    `args.calib_seed` set: the first seed in noise mode, else the given seed or 0."""
    given = args.calib_seeds is not None or args.window_sets is not None
    if args.calib_seeds is not None and args.calib_seed is not None:
        raise MetricGPError("give --calib-seed (one seed) or --calib-seeds (several), not both")
    if not given:
        if args.reference is not None:
            raise MetricGPError("--reference needs --calib-seeds or --window-sets")
        args.calib_seed = 0 if args.calib_seed is None else args.calib_seed
        return None
    seeds = parse_seeds(args.calib_seeds) if args.calib_seeds is not None else (args.calib_seed or 0,)
    k = 1 if args.window_sets is None else args.window_sets
    if k < 1:
        raise MetricGPError(f"--window-sets must be at least 1, got {k}")
    if args.eval_windows and k > args.eval_windows:
        raise MetricGPError(f"--window-sets {k} is more than the {args.eval_windows} --eval-windows")
    args.calib_seed = seeds[0]
    return NoiseOptions(seeds, k, args.reference or "wanda")


def setting_label(setting: str) -> str:
    return parse_setting(setting).label


def row_key(functional: str, setting: str, mode: str) -> str:
    return f"{functional}|{setting}|{mode}"


def split_windows(n: int, k: int, what: str = "the test split") -> list[tuple[int, int]]:
    """`n` windows cut into `k` consecutive disjoint [start, end) ranges covering them all; sizes
    differ by at most one (the first ones are longer)."""
    if k > n:
        raise MetricGPError(f"--window-sets {k} is more than the {n} windows of {what}")
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + n // k + (i < n % k))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def set_key(base: str, seed: int, index: int, k: int) -> str:
    """The row key of one seed's window set `index` (0-based) of `k`, for the classic row key `base`
    (`row_key`)."""
    return f"{base}|seed={seed}|set={index + 1}/{k}"


def combine(ppls: list[float], counts: list[int]) -> float:
    """The perplexity of the union of window sets: exp of the count-weighted mean log perplexity
    (every window predicts seqlen - 1 tokens, so window counts are token weights)."""
    if not all(math.isfinite(p) for p in ppls):
        return math.inf
    return math.exp(sum(c * math.log(p) for p, c in zip(ppls, counts, strict=True)) / sum(counts))


def relative(value: float, reference: float) -> float:
    """100 * (value / reference - 1): percent above the reference (negative: better)."""
    if not math.isfinite(reference):
        return math.nan
    return 100.0 * (value / reference - 1.0) if math.isfinite(value) else math.inf


def spread(values: list[float]) -> dict:
    """The values, their mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        return {"per_seed": [], "mean": math.nan, "std": None}
    finite = all(math.isfinite(v) for v in values)
    mean = statistics.fmean(values) if finite else (math.inf if all(v == math.inf for v in values) else math.nan)
    std = statistics.stdev(values) if finite and len(values) > 1 else None
    return {"per_seed": values, "mean": mean, "std": std}


def verdict(diff: dict, set_means: list[float], n: int) -> str:
    """'better' | 'worse' | 'within noise' | 'n/a (...)' for a paired difference by `RULE`."""
    if n < 2:
        return "n/a (one seed)"
    if all(v == math.inf for v in diff["per_seed"]):
        return "worse"  # the pruned model diverges on every seed while the reference does not
    if diff["std"] is None:
        return "n/a (non-finite)"
    mean = diff["mean"]
    same_sign = all(m * mean > 0 for m in set_means)
    if abs(mean) > SIGMAS * diff["std"] and same_sign:
        return "better" if mean < 0 else "worse"
    return "within noise"


def _set_values(table: dict, base: str, dataset: str, seed: int, k: int) -> list[float] | None:
    """One seed's perplexities on each window set, or None unless all were measured."""
    out = []
    for j in range(k):
        row = table["rows"].get(set_key(base, seed, j, k))
        if row is None or dataset not in row["perplexity"]:
            return None
        value = row["perplexity"][dataset]
        out.append(math.inf if value is None else float(value))
    return out


def _windows_of(table: dict, base: str, dataset: str, seed: int, k: int) -> list[list[int]]:
    return [table["rows"][set_key(base, seed, j, k)]["windows"][dataset] for j in range(k)]


def _metric_cell(label: str, sets: dict[int, list[float]], counts: list[int]) -> dict:
    seeds = sorted(sets)
    return {"metric": label, "seeds": seeds,
            "perplexity": spread([combine(sets[s], counts) for s in seeds]),
            "sets": [spread([sets[s][j] for s in seeds]) for j in range(len(counts))]}


def _paired(cell: dict, ref: dict, sets: dict[int, list[float]], ref_sets: dict[int, list[float]]) -> dict:
    """The paired difference of `cell` to the reference cell `ref`, over their common seeds."""
    common = [s for s in cell["seeds"] if s in ref_sets]
    ppl = dict(zip(cell["seeds"], cell["perplexity"]["per_seed"], strict=True))
    ref_ppl = dict(zip(ref["seeds"], ref["perplexity"]["per_seed"], strict=True))
    diff = spread([relative(ppl[s], ref_ppl[s]) for s in common])
    by_set = [spread([relative(sets[s][j], ref_sets[s][j]) for s in common]) for j in range(len(cell["sets"]))]
    diff.update(seeds=common, sets=by_set, verdict=verdict(diff, [d["mean"] for d in by_set], len(common)))
    return diff


def summarise(table: dict, entries: list, settings: list[str], modes: list[str], datasets: list[str],
              seeds: list[int], k: int, reference: str) -> dict:
    """Everything the noise report shows, computed from the rows: one group per (dataset, setting,
    mode) with its window ranges, the reference's noise band and one cell per measured metric."""

    formulas = {e.label: to_functional(e.tree) for e in entries}
    groups = []
    for dataset in datasets:
        for setting in settings:
            for mode in modes:
                bases = {label: row_key(f, setting, mode) for label, f in formulas.items()}
                measured = {}
                for label, base in bases.items():
                    sets = {s: v for s in seeds if (v := _set_values(table, base, dataset, s, k))}
                    if sets:
                        measured[label] = sets
                if reference not in measured:
                    continue
                windows = _windows_of(table, bases[reference], dataset, min(measured[reference]), k)
                counts = [b - a for a, b in windows]
                cells = {label: _metric_cell(label, sets, counts) for label, sets in measured.items()}
                ref = cells[reference]
                for label, cell in cells.items():
                    cell["formula"] = formulas[label]
                    cell["vs_reference"] = _paired(cell, ref, measured[label], measured[reference])
                    if label == reference:
                        cell["vs_reference"]["verdict"] = "reference"
                band = ref["perplexity"]
                band_pct = (100.0 * SIGMAS * band["std"] / band["mean"]) if band["std"] is not None else None
                groups.append({"dataset": dataset, "setting": setting, "mode": mode, "windows": windows,
                               "band_percent": band_pct, "metrics": list(cells.values())})
    return {"reference": reference, "rule": RULE, "sigmas": SIGMAS, "seeds": seeds, "window_sets": k,
            "groups": groups}


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _pm(s: dict, sign: bool = False) -> str:
    return f"{_fmt(s['mean'], sign=sign)} ± {_fmt(s['std'])}"


def _column_title(group: dict) -> str:
    return f"{setting_label(group['setting'])} {group['mode']}"


def _group_title(group: dict) -> str:
    return f"{group['dataset']} {_column_title(group)}"


def verdict_lines(summary: dict) -> list[str]:
    """'better than wanda: ...' / 'worse than wanda: ...' markdown bullets, from the summary."""
    lines = []
    for word in ("better", "worse"):
        found = [f"{c['metric']} on {_group_title(g)} ({_pm(c['vs_reference'], sign=True)}%)"
                 for g in summary["groups"] for c in g["metrics"] if c["vs_reference"]["verdict"] == word]
        lines.append(f"- significantly {word} than {summary['reference']}: " + ("; ".join(found) or "none"))
    return lines


def markdown(table: dict, summary: dict) -> str:
    ctx, ref, k = table["context"], summary["reference"], summary["window_sets"]
    set_cols = [f"set {j + 1}" for j in range(k)]
    lines = [
        "# Noise floor: test perplexity over calibration seeds and window sets",
        "",
        f"Model `{ctx['model']}` (weights {ctx['fingerprint']}), dtype {ctx['dtype']}; calibration "
        f"{ctx['n_calib']} x {ctx['seqlen']}-token windows of `{ctx['calib']}`, drawn with each of the calibration "
        f"seeds {', '.join(map(str, summary['seeds']))} (one sample, and one set of statistics, per seed); "
        f"evaluation on the first {ctx['eval_windows'] or 'all'} {ctx['seqlen']}-token windows of each test split, "
        f"cut into {k} consecutive disjoint window sets (ranges [start, end) below). Perplexities are mean ± std "
        "over seeds; 'all' is each seed's perplexity over every window (exp of the mean NLL), then mean ± std.",
        "",
        f"Δ is the paired difference to `{ref}`: 100 × (ppl(metric) / ppl({ref}) − 1) with the same seed and "
        f"windows, in percent (negative: better). **Rule:** {RULE}. The noise band is ± {SIGMAS:g} × the "
        f"std over seeds of `{ref}`'s own perplexity, in percent of its mean.",
        "",
        f"Made by (git {table['provenance']['git']}):",
        "",
        *[f"    {command}" for command in table.get("history", [table["provenance"]["command"]])],
        "",
        "## Verdict (computed from the rows below)",
        "",
        *verdict_lines(summary),
        "",
    ]
    for g in summary["groups"]:
        ranges = ", ".join(f"{name} [{a}, {b})" for name, (a, b) in zip(set_cols, g["windows"], strict=True))
        lines += [f"## {g['dataset']} (test), {_column_title(g)}", "",
                  f"Window sets: {ranges}. Noise band of `{ref}`: "
                  + (f"± {_fmt(g['band_percent'])}%." if g["band_percent"] is not None else "n/a (one seed)."), "",
                  "| metric | ppl all | " + " | ".join(f"ppl {c}" for c in set_cols) + " | Δ per seed (%) | "
                  "Δ all (%) | " + " | ".join(f"Δ {c} (%)" for c in set_cols) + " | verdict |",
                  "|---|" + "---:|" * (2 * k + 3) + "---|"]
        for c in g["metrics"]:
            d = c["vs_reference"]
            per_seed = ", ".join(f"{s}: {_fmt(v, sign=True)}" for s, v in zip(d["seeds"], d["per_seed"], strict=True))
            lines.append(f"| {c['metric']} | {_pm(c['perplexity'])} | " + " | ".join(_pm(s) for s in c["sets"])
                         + f" | {per_seed} | {_pm(d, sign=True)} | "
                         + " | ".join(_pm(s, sign=True) for s in d["sets"]) + f" | {d['verdict']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red"}


def _bars(ax, cells: list[dict], band: float | None) -> None:
    """Mean Δ with std error bars and its value written; beyond CLIP_PERCENT the bar stops inside
    the axis, hatched, so that the near-equal metrics keep a readable scale."""
    means = [c["vs_reference"]["mean"] for c in cells]
    errs = [c["vs_reference"]["std"] or 0.0 for c in cells]
    shown = [abs(m) + e for m, e in zip(means, errs, strict=True) if math.isfinite(m) and abs(m) <= CLIP_PERCENT]
    top = 1.3 * max([*shown, band or 0.0, 0.5])
    for i, (c, m, e) in enumerate(zip(cells, means, errs, strict=True)):
        colour = VERDICT_COLOURS.get(c["vs_reference"]["verdict"], "tab:gray")
        label = f"{_fmt(m, 0 if abs(m) > CLIP_PERCENT else 2, sign=True)}%"
        if math.isfinite(m) and abs(m) <= CLIP_PERCENT:
            ax.bar(i, m, 0.6, color=colour, yerr=e, capsize=3)
            ax.text(i + 0.32, m, label, ha="left", va="center", fontsize=6)
            continue
        clipped = math.copysign(0.92 * top, m) if not math.isnan(m) else 0.0
        ax.bar(i, clipped, 0.6, color=colour, hatch="//", alpha=0.6)
        ax.text(i, clipped / 2, label, rotation=90, ha="center", va="center", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    if band:
        ax.axhspan(-band, band, color="tab:blue", alpha=0.15, label=f"± {SIGMAS:g} std of reference")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylim(-top, top)
    ax.set_xlim(-0.7, len(cells) - 0.3)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([c["metric"] for c in cells], rotation=30, ha="right", fontsize=7)


def plot_relative(summary: dict, path: Path) -> None:
    """One panel per dataset (row) x setting/mode (column): each metric's paired difference to the
    reference, error bars = std over seeds, the reference's own noise band shaded."""

    groups = summary["groups"]
    if not groups:
        return
    datasets = list(dict.fromkeys(g["dataset"] for g in groups))
    columns = list(dict.fromkeys((g["setting"], g["mode"]) for g in groups))
    plt = pyplot()
    fig, axes = plt.subplots(len(datasets), len(columns), figsize=(max(6.0, 3.6 * len(columns)), 3.4 * len(datasets)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for g in groups:
        ax = axes[datasets.index(g["dataset"])][columns.index((g["setting"], g["mode"]))]
        ax.set_visible(True)
        _bars(ax, [c for c in g["metrics"] if c["metric"] != summary["reference"]], g["band_percent"])
        ax.set_title(f"{Path(g['dataset']).name} {_column_title(g)}", fontsize=9)
        ax.set_ylabel(f"Δ ppl vs {summary['reference']} (%)", fontsize=8)
    fig.suptitle(f"test perplexity relative to {summary['reference']}, mean ± std over calibration seeds "
                 f"{', '.join(map(str, summary['seeds']))}\ngreen/red: significantly better/worse; "
                 f"hatched: beyond ±{CLIP_PERCENT:g}%, clipped (value written)", fontsize=9)
    first = next(ax for ax in axes.flat if ax.get_visible())
    if first.get_legend_handles_labels()[0]:
        first.legend(loc="lower left", fontsize=7)
    save_figure(fig, path)
