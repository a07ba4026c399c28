"""`python -m metricgp.apply`: prune a causal LM with a metric and write the model and a report.

    python -m metricgp.apply --metric wanda --sparsity 0.5 --out runs/wanda50
    python -m metricgp.apply --metric "mul(abs(mul(W,W)), mms(G))" --pattern 2:4 --out runs/pz24
    python -m metricgp.apply --metric "abs(W) * sqrt(X)" --model path/or/hub-id --dataset wikitext2,c4 \\
        --out runs/mine
    python -m metricgp.apply --metric-file results/<run>/best.json --out runs/evolved

Everything the user gives is checked before the model loads. The output directory is written
under a temporary name and moved into place at the end, so an error leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from metricgp.errors import MetricGPError, cli_entry
from metricgp.expr import BUILTIN_METRICS, OPERATORS, Node, describe, formula_from_file, resolve_metric
from metricgp.options import add_model_data_options, add_pattern_options, evaluator_spec, pattern_from_args
from metricgp.prune.engine import PRUNE_MODES

REPORT = "report.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m metricgp.apply",
        description="Prune a causal LM with a metric (built-in, formula, or a search result) and report perplexity.",
        epilog=f"built-in metrics: {', '.join(BUILTIN_METRICS)}. Formulas combine the leaves W (weight), "
        "X (mean squared input activation per input feature) and G (per-weight gradient l2 norm) with "
        f"{' '.join(OPERATORS)}, in functional form mul(abs(W), sqrt(X)) or infix abs(W) * sqrt(X).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--metric", help="a built-in name or a formula")
    what.add_argument("--metric-file", type=Path, help="a JSON file with a 'formula' key (a search's best.json)")
    add_pattern_options(p)
    p.add_argument("--mode", choices=tuple(PRUNE_MODES), default="oneshot",
                   help="oneshot: statistics of the dense model; sequential: block by block, each block's "
                   "inputs recomputed after the earlier blocks were pruned; reconstruct: sequential, then "
                   "the kept weights re-fitted by least squares on the calibration inputs")
    add_model_data_options(p)
    add_report_options(p)
    return p


def add_report_options(p: argparse.ArgumentParser) -> None:
    """Evaluation data and the output directory: shared by the unstructured and structured modes."""
    p.add_argument("--dataset", default="wikitext2",
                   help="comma-separated evaluation data (their test splits): wikitext2, c4, ptb or a text file")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="evaluate on the first N test windows (0: the whole split; default 32)")
    p.add_argument("--out", type=Path, required=True, help="output directory (pruned model + report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-save-model", action="store_true", help="write only the report")
    p.add_argument("--no-dense-eval", action="store_true", help="skip the dense model's perplexity")


def validate_model_and_report(args: argparse.Namespace) -> None:
    """The shared options, checked before anything slow happens."""
    from metricgp.data import parse_data_ref, parse_report_data
    from metricgp.models import resolve_model_path

    evaluator_spec(args)  # checks --n-calib and --seqlen
    if args.eval_windows < 0:
        raise MetricGPError(f"--eval-windows must be at least 0, got {args.eval_windows}")
    parse_data_ref(args.calib, "calibration")
    parse_report_data(args.dataset)
    if args.out.exists() and not args.overwrite:
        raise MetricGPError(f"{args.out} exists; pass --overwrite or choose another --out")
    if args.out.exists() and not args.out.is_dir():
        raise MetricGPError(f"{args.out} exists and is not a directory")
    resolve_model_path(args.model)  # a missing path fails here; the default model converts once


def load_metric(args: argparse.Namespace) -> tuple[Node, str]:
    """The metric tree and where it came from."""
    if args.metric is not None:
        return resolve_metric(args.metric), "command line"
    path: Path = args.metric_file
    formula = formula_from_file(path)
    return resolve_metric(formula), str(path)


def validate(args: argparse.Namespace):
    """Check everything the user gave, before anything slow happens. Returns (tree, source, pattern)."""
    tree, source = load_metric(args)
    pattern = pattern_from_args(args)
    validate_model_and_report(args)
    return tree, source, pattern


def run(args: argparse.Namespace) -> dict:
    """Prune, evaluate and write `args.out`; returns the report."""
    from metricgp.data import parse_report_data
    from metricgp.evaluate import PruningSetup, cached_dense_perplexity, perplexity
    from metricgp.provenance import provenance, write_json_atomic

    tree, source, pattern = validate(args)
    started = provenance()
    spec = evaluator_spec(args, pattern=pattern.name, sparsity=pattern.sparsity)
    t0 = time.perf_counter()
    setup = PruningSetup.from_spec(spec, grads="G" in tree.leaves_used())
    n_eval = args.eval_windows or None
    evals = {d: setup.report_windows(d, n_eval) for d in parse_report_data(args.dataset)}
    timings = dict(setup.timings)

    t1 = time.perf_counter()
    dense_ppl = {} if args.no_dense_eval else {
        d: cached_dense_perplexity(setup, d, w) for d, w in evals.items()}
    timings["dense_eval"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    report = setup.prune(tree, pattern, args.mode)
    timings["prune"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    pruned_ppl = {d: perplexity(setup.model, w, progress=True) for d, w in evals.items()}
    timings["pruned_eval"] = time.perf_counter() - t3

    result = {
        "metric": {**describe(tree), "source": source},
        "pattern": pattern.name,
        "target_sparsity": pattern.sparsity,
        "mode": args.mode,
        "model": {"name": args.model, "path": setup.model_path, "fingerprint": setup.fingerprint,
                  "dtype": str(next(setup.model.parameters()).dtype).replace("torch.", "")},
        "calibration": {"data": args.calib, "windows": args.n_calib, "seqlen": args.seqlen, "seed": args.calib_seed,
                        "statistics_cached": setup.stats_cached},
        "evaluation": {d: {"windows": len(w), "seqlen": args.seqlen, "tokens": int(w.numel())}
                       for d, w in evals.items()},
        "perplexity": {"dense": dense_ppl, "pruned": pruned_ppl},
        "sparsity": {"overall": report.sparsity, "pruned_weights": report.pruned,
                     "prunable_weights": report.total, "per_layer": report.layer_sparsity},
        "timings_s": {k: round(v, 2) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 2)},
        "provenance": started,
    }
    _write_out(args, setup, result, write_json_atomic)
    return result


def _write_out(args: argparse.Namespace, setup, result: dict, write_json) -> None:
    def fill(tmp: Path) -> None:
        if not args.no_save_model:
            setup.model.save_pretrained(tmp)
            setup.tokenizer.save_pretrained(tmp)
        write_json(tmp / REPORT, result)

    write_out_dir(args.out, fill)


def write_out_dir(out: Path, fill) -> None:
    """Let `fill(tmp)` write into a temporary sibling, then move it into place: never a half-written
    `out`, and an error leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summary(result: dict) -> str:
    lines = [f"metric   {result['metric']['infix']}   ({result['pattern']}, {result['mode']}, "
             f"sparsity {result['sparsity']['overall']:.4f})"]
    for data, ppl in result["perplexity"]["pruned"].items():
        dense = result["perplexity"]["dense"].get(data)
        dense_txt = f"dense {dense:.3f}  ->  " if dense is not None else ""
        lines.append(f"{data:<10} {dense_txt}pruned {ppl:.3f}   ({result['evaluation'][data]['windows']} windows)")
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--structured" in argv:  # one entry point; structured pruning is a mode of it
        from metricgp.structured.cli import main as structured_main

        return structured_main(argv)
    args = build_parser().parse_args(argv)
    result = run(args)
    print(summary(result))
    print(f"wrote {args.out}/{REPORT}" + ("" if args.no_save_model else " and the pruned model"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
