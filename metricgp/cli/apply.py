"""`python -m metricgp.apply`: prune a causal LM with a metric and write the model and a report.

    python -m metricgp.apply --metric wanda --sparsity 0.5 --out runs/wanda50
    python -m metricgp.apply --metric "mul(abs(mul(W,W)), mms(G))" --pattern 2:4 --out runs/pz24
    python -m metricgp.apply --metric "abs(W) * sqrt(X)" --model path/or/hub-id --dataset wikitext2,c4 \\
        --out runs/mine
    python -m metricgp.apply --metric-file runs/<search>/best.json --out runs/evolved
    python -m metricgp.apply --structured --method flap --keep 0.7 --out runs/flap70   # structured mode
    python -m metricgp.apply --metric sparsegpt --mode reconstruct --recover-tokens 65536 --recover-method full \
        --recover-loss kd --out runs/sgpt50r     # recovery that keeps the zeros, distilled from the dense model

One parser holds both modes (masks by default; `--structured`: `metricgp.cli.structured`), so
`--help` lists every option; an option of the other mode is an error. Everything is checked before
the model loads, and the output directory is moved into place at the end (never half-written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from metricgp.cli import structured
from metricgp.cli.options import (
    REPORT,
    add_model_data_options,
    add_pattern_options,
    add_recovery_options,
    add_report_options,
    add_zero_shot_options,
    check_recovery_options,
    metric_from_args,
    pattern_from_args,
    prune_and_measure,
    recover_and_measure,
    validate_model_and_report,
    write_out_dir,
)
from metricgp.errors import MetricGPError, cli_entry
from metricgp.expr import BUILTIN_METRICS, OPERATORS, describe
from metricgp.offload import offload_of
from metricgp.provenance import write_json_atomic
from metricgp.prune.engine import PRUNE_MODES
from metricgp.recover import sparse_masks
from metricgp.structured.recover import RECOVERY_METHODS
from metricgp.zeroshot import zero_shot_lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m metricgp.apply",
        description="Prune a causal LM with a metric (built-in, formula, or a search result) and report perplexity: "
        "unstructured masks (default), or --structured: remove heads, MLP channels or decoder blocks physically.",
        epilog=f"built-in metrics: {', '.join(BUILTIN_METRICS)}. Formulas combine the leaves W (weight), "
        "X (mean squared input activation per input feature) and G (per-weight gradient l2 norm) with "
        f"{' '.join(OPERATORS)}, in functional form mul(abs(W), sqrt(X)) or infix abs(W) * sqrt(X).",
    )
    p.add_argument("--structured", action="store_true",
                   help="structured mode: remove heads, channels or blocks (the 'structured mode' options below)")
    m = p.add_argument_group("metric")
    m.add_argument("--metric", help="a built-in name, a formula, or a JSON file with a 'formula' key")
    m.add_argument("--metric-file", type=Path, help="a JSON file with a 'formula' key (a search's best.json)")
    u = p.add_argument_group("unstructured mode (default)")
    add_pattern_options(u)
    u.add_argument("--mode", choices=tuple(PRUNE_MODES), default="oneshot",
                   help="oneshot: statistics of the dense model; sequential: block by block, each block's "
                   "inputs recomputed after the earlier blocks were pruned; reconstruct: sequential, then "
                   "the kept weights re-fitted by least squares on the calibration inputs")
    structured.add_structured_options(p)
    add_recovery_options(p.add_argument_group(
        "recovery (both modes; an unstructured or N:M model keeps its zeros: masked gradients for full, masked "
        "adapters for lora)"), methods=tuple(RECOVERY_METHODS))
    add_model_data_options(p)
    add_report_options(p)
    add_zero_shot_options(p)
    return p


def check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An option of the other mode is an error, as it was when each mode had its own parser."""
    other = ("unstructured mode",) if args.structured else ("structured mode", "SAAP")
    given = [a.dest for g in parser._action_groups if g.title.startswith(other) for a in g._group_actions
             if getattr(args, a.dest) != a.default]
    if given:
        mode = "--structured" if not args.structured else "the unstructured mode (no --structured)"
        raise MetricGPError(f"{', '.join('--' + k.replace('_', '-') for k in given)} belong to {mode}")


def validate(args: argparse.Namespace):
    """Check everything the user gave, before anything slow happens. Returns (tree, source, pattern,
    zero-shot evaluation or None)."""
    tree, source = metric_from_args(args)
    if tree is None:
        raise MetricGPError("give --metric or --metric-file")
    pattern = pattern_from_args(args)
    check_recovery_options(args)
    if args.recover_tokens and not RECOVERY_METHODS[args.recover_method].keeps_masks:
        raise MetricGPError(f"--recover-method {args.recover_method} cannot keep the zeros of a sparse model "
                            "(lora or full; or --structured)")
    zero_shot = validate_model_and_report(args)
    return tree, source, pattern, zero_shot


def measure(args: argparse.Namespace):
    """Validate, load, prune and measure (`prune_and_measure`); returns (Measured, (tree, source, pattern))."""
    tree, source, pattern, zero_shot = validate(args)
    m = prune_and_measure(args, "G" in tree.leaves_used(), lambda s: (s.model, s.prune(tree, pattern, args.mode)),
                          zero_shot, inputs=tree.leaves_used(), pattern=pattern.name, sparsity=pattern.sparsity)
    return m, (tree, source, pattern)


def run(args: argparse.Namespace) -> dict:
    """Prune, evaluate and write `args.out`; returns the report."""
    m, (tree, source, pattern) = measure(args)
    setup, evals, report = m.setup, m.evals, m.outcome
    recovery, recovered = None, None
    if args.recover_tokens:
        masks = sparse_masks(m.model)  # the pattern the pruning left, before any training
        recovery, recovered = recover_and_measure(args, m, masks)
        recovery["sparsity_after"] = _sparsity(setup)

    result = {
        "metric": {**describe(tree), "source": source},
        "pattern": pattern.name,
        "target_sparsity": pattern.sparsity,
        "mode": args.mode,
        "model": {"name": args.model, "path": setup.model_path, "fingerprint": setup.fingerprint,
                  "offloaded": offload_of(setup.model) is not None,
                  "dtype": str(next(setup.model.parameters()).dtype).replace("torch.", "")},
        "calibration": {"data": args.calib, "windows": args.n_calib, "seqlen": args.seqlen, "seed": args.calib_seed,
                        "statistics_cached": setup.stats_cached},
        "evaluation": {d: {"windows": len(w), "seqlen": args.seqlen, "tokens": int(w.numel())}
                       for d, w in evals.items()},
        "perplexity": {"dense": m.dense_ppl, "pruned": m.pruned_ppl} | ({"recovered": recovered} if recovery else {}),
        **({"zero_shot": m.zero_shot_report()} if m.zero_shot else {}),
        "sparsity": {"overall": report.sparsity, "pruned_weights": report.pruned,
                     "prunable_weights": report.total, "per_layer": report.layer_sparsity},
        **({"recovery": recovery} if recovery else {}),
        "timings_s": {k: round(v, 2) for k, v in m.timings.items()} | {"total": round(time.perf_counter() - m.t0, 2)},
        "provenance": m.provenance,
    }
    _write_out(args, setup, result, write_json_atomic)
    return result


def _sparsity(setup) -> float:
    """The fraction of zero weights over the prunable layers, read from the model."""
    zeros = sum(int((m.weight == 0).sum()) for m in setup.layers.values())
    return zeros / sum(m.weight.numel() for m in setup.layers.values())


def _write_out(args: argparse.Namespace, setup, result: dict, write_json) -> None:
    def fill(tmp: Path) -> None:
        if not args.no_save_model:
            setup.model.save_pretrained(tmp)
            setup.tokenizer.save_pretrained(tmp)
        write_json(tmp / REPORT, result)

    write_out_dir(args.out, fill)


def summary(result: dict) -> str:
    lines = [f"metric   {result['metric']['infix']}   ({result['pattern']}, {result['mode']}, "
             f"sparsity {result['sparsity']['overall']:.4f})"]
    for data, ppl in result["perplexity"]["pruned"].items():
        dense = result["perplexity"]["dense"].get(data)
        dense_txt = f"dense {dense:.3f}  ->  " if dense is not None else ""
        rec = result["perplexity"].get("recovered", {}).get(data)
        rec_txt = f"  ->  recovered {rec:.3f}" if rec is not None else ""
        lines.append(f"{data:<10} {dense_txt}pruned {ppl:.3f}{rec_txt}   ({result['evaluation'][data]['windows']} "
                     "windows)")
    return "\n".join(lines + zero_shot_lines(result))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_mode(parser, args)
    result = (structured.run if args.structured else run)(args)
    print((structured.summary if args.structured else summary)(result))
    print(f"wrote {args.out}/{REPORT}" + ("" if args.no_save_model else " and the pruned model"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
