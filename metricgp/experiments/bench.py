"""Benchmarks of the search's fitness: throughput, and how well cheap fidelities rank metrics.

    python -m metricgp.bench throughput      # make bench: evaluations/hour and the naive ratio
    python -m metricgp.bench fidelity --out results/fidelity   # Spearman of cheap vs full fitness
    python -m metricgp.bench refit-fidelity --fidelities 2,4,8 --full 16 --out results/refit-fidelity

`throughput` measures, in one run, (a) the search's way of evaluating a candidate: statistics
loaded from the cache once, compiled metric, exact masks, perplexity on the first fidelity's
windows, successive halving to the later ones; and (b) the naive way of the released Pruner-Zero
code: recompute the calibration statistics for every candidate, then the perplexity of the whole
validation split. (b)'s statistics pass is run for real once; its full-split perplexity is
the measured time per window times the number of validation windows (running ~500 windows per
candidate would take ~10 minutes here).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from metricgp.cli.options import add_model_data_options, add_pattern_options, evaluator_spec, pattern_from_args
from metricgp.errors import MetricGPError, cli_entry
from metricgp.evaluate import MetricEvaluator
from metricgp.expr import BUILTIN_METRICS, Node, compile_metric, resolve_metric, to_functional
from metricgp.expr.randomtree import random_tree
from metricgp.measure import DenseReference, perplexity, window_losses
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import dumps, json_safe, provenance, write_json_atomic
from metricgp.prune.engine import DegenerateMetric, DenseWeights, PruneReport, layer_scores, mask_layer
from metricgp.prune.patterns import kth_smallest
from metricgp.ranking import spearman as rho
from metricgp.refit_fitness import RefitResidualEvaluator
from metricgp.stats import compute_stats

PANEL_OPS = ("sqr", "abs", "sqrt", "log", "mms", "zsn", "tanh", "add", "mul", "div", "sub")


def metric_panel(n_random: int, seed: int, run_dir: Path | None = None, top: int = 10) -> list[tuple[str, Node]]:
    """The built-ins, the top `top` formulas of a search run's hall of fame (competitive metrics,
    which random trees rarely are), then `n_random` random W/X/G trees (seeded, distinct, using W)."""
    panel = [(name, resolve_metric(name)) for name in BUILTIN_METRICS]
    seen = {to_functional(t) for _, t in panel}
    if run_dir is not None:
        path = Path(run_dir) / "hall_of_fame.json"
        if not path.is_file():
            raise MetricGPError(f"{run_dir} has no hall_of_fame.json")
        for entry in json.loads(path.read_text(encoding="utf-8"))["entries"][:top]:
            tree = resolve_metric(entry["functional"])
            if to_functional(tree) not in seen:
                seen.add(to_functional(tree))
                panel.append((f"hof-{entry['rank']}", tree))
    rng = random.Random(seed)
    n_random += len(panel) - len(BUILTIN_METRICS)
    while len(panel) < len(BUILTIN_METRICS) + n_random:
        tree = random_tree(rng, 4, PANEL_OPS)
        text = to_functional(tree)
        if text in seen or "W" not in tree.leaves_used():
            continue
        seen.add(text)
        panel.append((f"random-{sum(n.startswith('random') for n, _ in panel) + 1}", tree))
    return panel


def spearman(a: list[float], b: list[float]) -> float:
    """`metricgp.ranking.spearman`, with NaN (a JSON null once written) where that gives None."""
    value = rho(a, b)
    return math.nan if value is None else value


def _evaluator(args: argparse.Namespace, fidelities: tuple[int, ...]):
    pattern = pattern_from_args(args)
    return MetricEvaluator(evaluator_spec(args, sparsity=pattern.sparsity, pattern=pattern.name,
                                          fidelities=fidelities))


def overhead_profile(setup, tree: Node, pattern) -> dict[str, float]:
    """Where a first-stage evaluation's time goes besides the forward pass, summed over the model's
    layers, phase by phase of the real path (`prune_oneshot`, then the restore before the next
    candidate): the compiled metric with its finite/constant checks, the mask (exact per-row k-th
    selection and the comparison), writing it into the weights, counting it, restoring the dense
    weights. Outside those sums: the selection alone, and torch.kthvalue on the same scores (the
    baseline of the selection; numpy's introselect is what `kth_smallest` uses on the CPU)."""


    fn = compile_metric(tree)
    parts = dict.fromkeys(("metric_and_checks", "mask", "apply", "count", "restore"), 0.0)
    select = select_torch = 0.0
    k_of = getattr(pattern, "sparsity", 0.5)
    report = PruneReport()
    for name, module in setup.dense.layers.items():
        w = setup.dense.weights[name]
        t0 = time.perf_counter()
        scores = layer_scores(fn, w, setup.stats[name], name)
        t1 = time.perf_counter()
        keep = pattern.mask(scores)
        t2 = time.perf_counter()
        mask_layer(module, w, keep)
        t3 = time.perf_counter()
        report.add(name, keep)
        t4 = time.perf_counter()
        for key, dt in zip(("metric_and_checks", "mask", "apply", "count"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
                           strict=True):
            parts[key] += dt
        k = max(round(k_of * scores.shape[-1]), 1)
        t5 = time.perf_counter()
        kth_smallest(scores, k)
        t6 = time.perf_counter()
        scores.kthvalue(k, dim=-1, keepdim=True)
        select, select_torch = select + t6 - t5, select_torch + time.perf_counter() - t6
    t7 = time.perf_counter()
    setup.dense.restore()
    parts["restore"] = time.perf_counter() - t7
    out = {key: round(v, 3) for key, v in parts.items()}
    out["total"] = round(sum(parts.values()), 3)
    out.update(select_within_mask=round(select, 3), select_torch_kthvalue=round(select_torch, 3),
               select_speedup_vs_torch_kthvalue=round(select_torch / max(select, 1e-9), 2))
    return out


def restore_profile(setup, repeats: int = 5) -> dict:
    """Restoring every layer's dense weight, three ways, alternated `repeats` times in this run (best of
    each): read back from the checkpoint on torch's threads (what the search does), the same read on one
    thread, and copying from a kept copy of the weights (the baseline: what the search did before it
    stopped keeping a second copy of the model)."""
    dense = setup.dense
    if dense.source != "checkpoint":
        return {"source": dense.source}
    kept = DenseWeights(dense.layers)  # no checkpoint given: keeps a copy
    threads = torch.get_num_threads()

    def one_thread() -> None:
        torch.set_num_threads(1)
        try:
            dense.restore()
        finally:
            torch.set_num_threads(threads)

    ways = {"checkpoint_threads": dense.restore, "checkpoint_one_thread": one_thread, "kept_copy": kept.restore}
    best = dict.fromkeys(ways, math.inf)
    for _ in range(repeats):
        for way, restore in ways.items():
            with torch.no_grad():
                for module in dense.layers.values():
                    module.weight.mul_(0.5)  # every layer changed, as after pruning
            t0 = time.perf_counter()
            restore()
            best[way] = min(best[way], time.perf_counter() - t0)
    del kept
    dense.restore()  # the kept copy wrote last: this session's own marks see every layer changed
    out: dict = {way: round(v, 4) for way, v in best.items()}
    out.update(threads=threads, repeats=repeats,
               threads_vs_kept_copy=round(best["checkpoint_threads"] / best["kept_copy"], 2),
               one_thread_vs_kept_copy=round(best["checkpoint_one_thread"] / best["kept_copy"], 2))
    return out


def throughput(args: argparse.Namespace) -> dict:
    fidelities = tuple(args.fidelities)
    t0 = time.perf_counter()
    ev = _evaluator(args, fidelities)
    setup = ev.setup
    load_s = time.perf_counter() - t0
    panel = metric_panel(args.random, args.panel_seed)[: args.candidates]
    per_fid: dict[int, list[float]] = {n: [] for n in fidelities}
    ev.timings.clear()
    for _, tree in panel:
        for n in fidelities[:2]:
            per_fid[n].append(ev.evaluate(tree, n).seconds)
    n_evals = len(panel) * 2
    score_mask = ev.timings["score_mask"] / n_evals
    restore = ev.timings["restore"] / n_evals
    forward_per_window = ev.timings["forward"] / ev.timings["windows"]
    cost = {n: score_mask + restore + forward_per_window * n for n in fidelities}
    # successive halving: every candidate pays stage 0, 1/eta of them stage 1, 1/eta^2 stage 2 ...;
    # a promoted candidate is pruned again but runs only the windows it has not seen (prefixes)
    previous = (0, *fidelities[:-1])
    raced = sum((score_mask + restore + forward_per_window * (n - seen)) / args.eta**i
                for i, (n, seen) in enumerate(zip(fidelities, previous, strict=True)))

    t1 = time.perf_counter()
    compute_stats(setup.model, setup.layers, setup.calib, grads=True, desc="naive stats")
    stats_s = time.perf_counter() - t1
    valid_windows = len(setup.fitness_windows(None))
    naive = stats_s + score_mask + restore + forward_per_window * valid_windows
    result = {
        "model": args.model, "sparsity": ev.pattern.sparsity, "pattern": ev.pattern.name, "fidelities": fidelities,
        "eta": args.eta, "candidates": len(panel),
        "setup_seconds": {"load_model_and_cached_stats": round(load_s, 2), **{
            k: round(v, 2) for k, v in setup.timings.items()}},
        "per_evaluation_seconds": {"score_and_mask": round(score_mask, 3), "restore": round(restore, 3),
                                   "forward_per_window": round(forward_per_window, 3),
                                   **{f"total_at_{n}_windows": round(cost[n], 3) for n in fidelities}},
        "measured_mean_seconds": {str(n): round(statistics.mean(v), 3) for n, v in per_fid.items() if v},
        "raced_seconds_per_candidate": round(raced, 3),
        "naive": {"stats_recompute_seconds": round(stats_s, 2), "validation_windows": valid_windows,
                  "seconds_per_candidate": round(naive, 1)},
        "evaluations_per_hour": {"first_fidelity": round(3600 / cost[fidelities[0]]),
                                 "raced_candidates": round(3600 / raced), "naive": round(3600 / naive, 1)},
        "speedup_vs_naive": round(naive / raced, 1),
        "score_and_mask_profile_wanda": overhead_profile(setup, resolve_metric("wanda"), ev.pattern),
        "restore_seconds": restore_profile(setup),
        "torch_threads": torch.get_num_threads(),
    }
    return result


def rank_agreement(rows: list[dict], cheap: Sequence, full) -> tuple[int, dict, dict]:
    """Spearman rho of each cheap fitness key against the `full` key over the rows whose values are
    all finite, and over the better half of them (telling good metrics apart is what the search
    needs). Returns (number of finite rows, rho, rho over the better half)."""
    finite = [r for r in rows if all(math.isfinite(v) for v in r["fitness"].values())]
    if len(finite) < 3:
        raise MetricGPError("fewer than 3 non-degenerate metrics in the panel")
    good = sorted(finite, key=lambda r: r["fitness"][full])[: max(3, len(finite) // 2)]
    rho = {n: spearman([r["fitness"][n] for r in finite], [r["fitness"][full] for r in finite]) for n in cheap}
    rho_good = {n: spearman([r["fitness"][n] for r in good], [r["fitness"][full] for r in good]) for n in cheap}
    return len(finite), rho, rho_good


class PanelRows:
    """A panel benchmark's rows, written to `<out>/<which>.partial.json` after every metric and
    taken back by a rerun with the same arguments, so a long panel resumes where it stopped."""

    def __init__(self, args: argparse.Namespace, which: str):
        self.settings = json_safe({k: v for k, v in vars(args).items() if k != "out"})
        self.path = args.out / f"{which}.partial.json" if args.out else None
        self.rows: list[dict] = []
        self.done: dict[tuple[str, str], dict] = {}
        if self.path is not None and self.path.is_file():
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            if stored.get("settings") == self.settings:
                self.done = {(r["name"], r["formula"]): r for r in stored["rows"]}

    def resumed(self, name: str, formula: str) -> bool:
        """Take this metric's row from the previous run, if it has one."""
        row = self.done.get((name, formula))
        if row is not None:
            self.rows.append({**row, "fitness": {k: math.inf if v is None else v for k, v in row["fitness"].items()}})
        return row is not None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"settings": self.settings, "rows": self.rows})


def fidelity(args: argparse.Namespace) -> dict:
    """Fitness of a metric panel at each cheap fidelity (perplexity on the first n validation
    windows, `--fidelities`; KL to dense on the first n, `--kl-fidelities`) against validation
    perplexity on the first `--full` windows (the reference); Spearman rho. Every fidelity stage
    reads a prefix of the same windows, so one pruning and one forward pass per metric give them all."""


    kl_fidelities = sorted(set(args.kl_fidelities or ()))
    if max([*args.fidelities, *kl_fidelities]) > args.full:
        raise MetricGPError(f"the cheap fidelities must not exceed --full {args.full}")
    ev = _evaluator(args, (args.full,))
    kl_ref = DenseReference.build(ev.setup.model, ev.valid[: max(kl_fidelities)]) if kl_fidelities else None
    ppl_keys = sorted({*args.fidelities, args.full})
    panel = metric_panel(args.random, args.panel_seed, args.panel_from, args.top)
    panel_rows = PanelRows(args, "fidelity")
    for name, tree in tqdm(panel, desc="panel", unit="metric"):
        if panel_rows.resumed(name, to_functional(tree)):
            continue
        try:
            ev.prune_with(tree)
            losses = window_losses(ev.setup.model, ev.valid, ev.spec.batch_size, kl_ref)
            values = {str(n): losses.perplexity(n) for n in ppl_keys}
            values.update({f"kl{n}": losses.kl_to_dense(n) for n in kl_fidelities})
        except DegenerateMetric:
            values = {**{str(n): math.inf for n in ppl_keys}, **{f"kl{n}": math.inf for n in kl_fidelities}}
        finally:
            ev.setup.dense.restore()
        panel_rows.add({"name": name, "formula": to_functional(tree), "fitness": values})
    rows = panel_rows.rows
    cheap = [str(n) for n in ppl_keys if n != args.full] + [f"kl{n}" for n in kl_fidelities]
    n_finite, rho, rho_good = rank_agreement(rows, cheap, str(args.full))
    return {"model": args.model, "sparsity": ev.pattern.sparsity, "pattern": ev.pattern.name, "full_windows": args.full,
            "full_key": str(args.full), "metrics": len(rows), "non_degenerate": n_finite,
            "spearman_vs_full": rho, "spearman_vs_full_better_half": rho_good, "rows": rows}


def refit_fidelity(args: argparse.Namespace) -> dict:
    """How well the refit-residual fitness (`metricgp.refit_fitness`, on 1..N sampled blocks) ranks a
    metric panel against what it stands for: validation perplexity after full reconstruct mode
    (sequential pruning + least-squares refit of every layer) on `--full` windows. Spearman rho."""


    pattern = pattern_from_args(args)
    spec = evaluator_spec(args, sparsity=pattern.sparsity, pattern=pattern.name, fidelities=tuple(args.fidelities))
    proxy = RefitResidualEvaluator(spec)
    setup = proxy.setup
    valid = setup.fitness_windows(args.full)
    panel = metric_panel(args.random, args.panel_seed, args.panel_from, args.top)
    panel_rows = PanelRows(args, "refit-fidelity")
    for name, tree in tqdm(panel, desc="panel", unit="metric"):
        if panel_rows.resumed(name, to_functional(tree)):
            continue
        values, seconds = {}, {}
        for n in proxy.fidelities:
            res = proxy.evaluate(tree, n)
            values[str(n)] = res.fitness
            seconds[str(n)] = res.seconds
        try:
            setup.prune(tree, pattern, mode="reconstruct")
            values["full"] = perplexity(setup.model, valid, 4)
        except DegenerateMetric as err:  # no reconstruct-mode perplexity
            values["full"] = math.inf
            print(f"{name}: {err}", file=sys.stderr)
        finally:
            setup.dense.restore()
        panel_rows.add({"name": name, "formula": to_functional(tree), "fitness": values, "seconds": seconds})
    rows = panel_rows.rows
    cheap = [str(n) for n in proxy.fidelities]
    n_finite, rho, rho_good = rank_agreement(rows, cheap, "full")
    return {"model": args.model, "sparsity": pattern.sparsity, "pattern": pattern.name, "full_windows": args.full,
            "full_key": "full",
            "metrics": len(rows), "non_degenerate": n_finite, "spearman_vs_full": rho,
            "spearman_vs_full_better_half": rho_good,
            "proxy_seconds_per_evaluation": {n: round(statistics.mean(r["seconds"][n] for r in rows), 3)
                                             for n in cheap},
            "x_label": "refit residual, {n} block(s)", "y_label": "validation ppl after reconstruct mode, "
            f"{args.full} windows", "rows": rows}


def fidelity_plot(result: dict, path: Path) -> None:
    plt = pyplot()
    full = result.get("full_key", result["full_windows"])
    cheap = list(result["spearman_vs_full"])
    fig, axes = plt.subplots(1, len(cheap), figsize=(4.2 * len(cheap), 4), squeeze=False)
    rows = [r for r in result["rows"] if all(math.isfinite(v) for v in r["fitness"].values())]
    for ax, key in zip(axes[0], cheap, strict=True):
        xs = [r["fitness"][key] for r in rows]
        ys = [r["fitness"][full] for r in rows]
        ax.scatter(xs, ys)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(r["name"], (x, y), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        is_kl = str(key).startswith("kl")
        label = "KL to dense, {n} window(s)" if is_kl else result.get("x_label", "validation ppl, {n} window(s)")
        ax.set_xlabel(label.format(n=str(key).removeprefix("kl")))
        ax.set_ylabel(result.get("y_label", f"validation ppl, {result['full_windows']} windows"))
        ax.set_title(f"Spearman rho = {result['spearman_vs_full'][key]:.3f}"
                     f" (better half {result['spearman_vs_full_better_half'][key]:.2f})")
    save_figure(fig, path)


# benchmark name -> (fn(args) -> result, plot(result, path) or None)
BENCHMARKS = {
    "throughput": (throughput, None),
    "fidelity": (fidelity, fidelity_plot),
    "refit-fidelity": (refit_fidelity, fidelity_plot),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.bench", description=__doc__.split("\n")[0])
    p.add_argument("which", choices=tuple(BENCHMARKS))
    add_model_data_options(p)
    add_pattern_options(p)
    p.add_argument("--fidelities", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    p.add_argument("--eta", type=int, default=3)
    p.add_argument("--kl-fidelities", type=lambda s: [int(v) for v in s.split(",")], default=[],
                   help="fidelity: also rank by KL to dense on the first n windows (the reference stays perplexity)")
    p.add_argument("--full", type=int, default=64, help="windows of the reference fitness (fidelity, refit-fidelity)")
    p.add_argument("--random", type=int, default=7, help="random trees added to the built-ins")
    p.add_argument("--candidates", type=int, default=6, help="metrics timed (throughput)")
    p.add_argument("--panel-seed", type=int, default=0, help="seed of the random metrics of the panel")
    p.add_argument("--panel-from", type=Path, metavar="RUN_DIR",
                   help="add the top --top hall-of-fame formulas of this search run to the panel")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", type=Path, help="write <which>.json (and a plot) here")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run, plot = BENCHMARKS[args.which]
    result = run(args)
    result["provenance"] = provenance()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / f"{args.which}.json", result)
        if plot is not None:
            plot(result, args.out / f"{args.which}.png")
        (args.out / f"{args.which}.partial.json").unlink(missing_ok=True)  # finished: nothing to resume
    shown = {k: v for k, v in result.items() if k not in ("rows", "provenance")}
    print(dumps(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
