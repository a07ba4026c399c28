"""`python -m metricgp.apply --structured`: remove heads, channels or blocks by any metric.

    python -m metricgp.apply --structured --method evolved --keep 0.7 --out runs/s70
    python -m metricgp.apply --structured --metric wanda --keep 0.7 --allocation global \\
        --recover-tokens 200000 --out runs/s70r
    python -m metricgp.apply --structured --importance flap --bias-compensation --keep 0.7 --out runs/flap70
    python -m metricgp.apply --structured --structures depth --importance shortgpt --keep 0.8 --out runs/short80
    python -m metricgp.apply --structured --importance saap --keep 0.7 --out runs/saap70
    python -m metricgp.apply --structured --importance saap --estimators taylor-element,taylor-vector,magnitude,wanda,\
best.json --keep 0.7 --group-finetune-tokens 200000 --out runs/saap70ft

The result is a physically smaller model that reloads with `metricgp.load_pruned(out)` or, after
`import metricgp`, with plain `AutoModelForCausalLM.from_pretrained(out)`, plus report.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metricgp.cli.options import (
    RECOVERY_VALID_WINDOWS,
    REPORT,
    check_recovery_options,
    metric_from_args,
    prune_and_measure,
    recover_and_measure,
    validate_model_and_report,
    write_out_dir,
)
from metricgp.errors import MetricGPError
from metricgp.expr import describe
from metricgp.measure import perplexity
from metricgp.offload import offload_of
from metricgp.provenance import write_json_atomic
from metricgp.structured.allocate import ALLOCATIONS
from metricgp.structured.evaluator import (
    BLOCK_IMPORTANCES,
    IMPORTANCES,
    PLANNERS,
    STRUCTURES,
    UNIT_IMPORTANCES,
    StructuredSpec,
    per_layer_sizes,
    prune,
    speed_report,
)
from metricgp.structured.groups import HEAD_MODES
from metricgp.structured.importance import NORMALISATIONS, REDUCTIONS
from metricgp.structured.methods import METHODS, get_method
from metricgp.structured.recover import compare_with_lora
from metricgp.structured.saap import SAAPOptions
from metricgp.structured.saap.estimators import DEFAULT_ESTIMATORS, ESTIMATORS, split_estimators
from metricgp.structured.saving import save_pruned
from metricgp.zeroshot import zero_shot_lines

DEFAULTS = StructuredSpec()


def add_structured_options(p: argparse.ArgumentParser) -> None:
    """The structured mode's options (`python -m metricgp.apply --structured`), in two groups."""
    g = p.add_argument_group("structured mode (--structured)")
    g.add_argument("--keep", type=float, default=DEFAULTS.keep, help="fraction of decoder parameters kept (0, 1]")
    g.add_argument("--importance", default=None,
                   help=f"width: {', '.join([*IMPORTANCES, *UNIT_IMPORTANCES])}; depth: {', '.join(BLOCK_IMPORTANCES)}")
    g.add_argument("--structures", choices=STRUCTURES, default=None,
                   help="width: heads and MLP channels; depth: whole decoder blocks")
    g.add_argument("--allocation", default=None, help=f"{', '.join([*ALLOCATIONS, *PLANNERS])}")
    g.add_argument("--keep-map", type=Path, help="JSON {module name: fraction of its heads/channels kept}, or a level "
                   "search's best.json (its winner); overrides --allocation and --keep")
    g.add_argument("--reduction", default=None, help=f"{', '.join(REDUCTIONS)}")
    g.add_argument("--normalisation", default=None, help=f"{', '.join(NORMALISATIONS)}")
    g.add_argument("--head-mode", default=None, help=f"{', '.join(HEAD_MODES)} (GQA: remove the "
                   "same number of query heads from every KV group, or whole KV groups)")
    g.add_argument("--method", help=f"a named method ({', '.join(METHODS)}); explicit options override it, "
                   "--metric/--metric-file its metric (the evolved* presets: the default search's best formula)")
    g.add_argument("--bias-compensation", action="store_true", default=None,
                   help="fold the removed channels' mean output into a bias (FLAP)")
    g.add_argument("--refit", action="store_true", default=None,
                   help="re-fit each pruned module's output projection by least squares on calibration inputs")
    g.add_argument("--speed", action="store_true", help="measure prefill/decode throughput, dense vs pruned")
    add_saap_options(p)



def add_saap_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SAAP (--importance saap; metricgp.structured.saap)")
    g.add_argument("--estimators", default=None,
                   help=f"comma-separated importance estimators fused by learned uncertainty: {', '.join(ESTIMATORS)}, "
                   f"metric formulas or JSON files with a 'formula' key (default {','.join(DEFAULT_ESTIMATORS)})")
    g.add_argument("--skip-edge-blocks", action="store_true", default=None,
                   help="leave the first and last decoder blocks untouched")
    g.add_argument("--fusion", default=None,
                   help="how estimators are fused: uncertainty (default; sigma_k from each estimator's rank error "
                   "against measured probes), consistency (from the variance across windows only), mean")
    g.add_argument("--saap-spread", type=float, default=None,
                   help="how non-uniform the per-layer ratios are, in [0, 1] (0: uniform; default 0.5)")
    g.add_argument("--group-finetune-tokens", type=int, default=0,
                   help="group fine-tuning budget in tokens (--recover-method group-lora; 0: none)")
    g.add_argument("--group-finetune-groups", type=int, default=4, help="input-column groups per linear (default 4)")
    g.add_argument("--compare-lora", action="store_true",
                   help="also recover a copy with plain LoRA at the same budget and trainable-parameter count")


def saap_options(args: argparse.Namespace, importance: str, allocation: str) -> dict | None:
    """SAAP's options from the command line (validated), or None for other importances."""
    given = {k: v for k, v in (("estimators", args.estimators and split_estimators(args.estimators)),
                               ("skip_edge_blocks", args.skip_edge_blocks), ("spread", args.saap_spread),
                               ("fusion", args.fusion))
             if v is not None}
    if importance != "saap":
        if given:
            raise MetricGPError("--estimators, --fusion, --skip-edge-blocks and --saap-spread need --importance saap")
        return None
    if allocation != "stability" and {"skip_edge_blocks", "spread"} & set(given):
        raise MetricGPError(f"--skip-edge-blocks and --saap-spread shape the stability allocation, not '{allocation}'")
    return SAAPOptions.from_dict(given).to_dict()


def load_keep_map(path: Path | None) -> dict[str, float] | None:
    if path is None:
        return None
    if not path.is_file():
        raise MetricGPError(f"keep map not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MetricGPError(f"keep map {path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("keep_map"), dict):
        data = data["keep_map"]  # a level search's best.json: its winner
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise MetricGPError(f"keep map {path} must be a JSON object of module name -> fraction, or a level "
                            "search's best.json")
    return {str(k): float(v) for k, v in data.items()}


SPEC_OPTIONS = ("importance", "reduction", "normalisation", "allocation", "head_mode", "structures",
                "bias_compensation", "refit")


def spec_from_args(args: argparse.Namespace) -> StructuredSpec:
    """Explicit options, else the --method preset, else the evaluator's defaults."""
    name = args.method or ("saap" if args.importance == "saap" else None)  # saap: its own allocation too
    preset = get_method(name).spec if name else {}
    fields = {k: getattr(args, k) if getattr(args, k) is not None else preset.get(k, getattr(DEFAULTS, k))
              for k in SPEC_OPTIONS}
    return StructuredSpec(keep=args.keep, keep_map=load_keep_map(args.keep_map),
                          options=saap_options(args, fields["importance"], fields["allocation"]), **fields).validate()


def validate_recovery(args: argparse.Namespace) -> None:
    """--group-finetune-tokens N is --recover-tokens N --recover-method group-lora."""
    check_recovery_options(args)
    if args.group_finetune_tokens < 0:
        raise MetricGPError(f"--group-finetune-tokens must be >= 0, got {args.group_finetune_tokens}")
    if args.group_finetune_tokens:
        if args.recover_tokens:
            raise MetricGPError("give --recover-tokens or --group-finetune-tokens, not both")
        args.recover_tokens, args.recover_method = args.group_finetune_tokens, "group-lora"
    if args.compare_lora and not (args.recover_tokens and args.recover_method == "group-lora"):
        raise MetricGPError("--compare-lora compares group fine-tuning with LoRA: give --group-finetune-tokens")


def validate(args: argparse.Namespace):
    validate_recovery(args)
    spec = spec_from_args(args)
    if spec.importance == "saap" and (args.metric is not None or args.metric_file is not None):
        raise MetricGPError("importance 'saap' takes metric formulas in --estimators (e.g. "
                            "--estimators taylor-element,best.json), not --metric/--metric-file")
    if args.metric is None and args.metric_file is None and args.method and get_method(args.method).metric:
        args.metric = get_method(args.method).metric
    tree, source = metric_from_args(args)
    if tree is None and spec.importance == "metric":
        raise MetricGPError("importance 'metric' needs --metric or --metric-file")
    zero_shot = validate_model_and_report(args)
    return spec, tree, source, zero_shot


def measure(args: argparse.Namespace):
    """Validate, load, prune and measure (`prune_and_measure`); returns (Measured, (spec, tree, source))."""
    spec, tree, source, zero_shot = validate(args)
    # the dense model is not needed once its perplexity is measured, except by --speed: shrunk in place
    # the formula's input statistics and X (FLAP and SAAP read it); a method without a formula: all
    m = prune_and_measure(args, tree is not None and "G" in tree.leaves_used(),
                          lambda s: prune(s, tree, spec, in_place=not args.speed), zero_shot,
                          inputs=None if tree is None else {*tree.leaves_used(), "X"})
    return m, (spec, tree, source)


def run(args: argparse.Namespace) -> dict:
    m, (spec, tree, source) = measure(args)
    setup, evals, model, sizes, timings = m.setup, m.evals, m.model, m.outcome, m.timings

    result = {
        "mode": "structured",
        "structured": spec.to_dict(),
        "metric": {**describe(tree), "source": source} if tree is not None else None,
        "model": {"name": args.model, "path": setup.model_path, "fingerprint": setup.fingerprint,
                  "offloaded": offload_of(setup.model) is not None},
        "calibration": {"data": args.calib, "windows": args.n_calib, "seqlen": args.seqlen, "seed": args.calib_seed},
        "evaluation": {d: {"windows": len(w), "seqlen": args.seqlen, "tokens": int(w.numel())}
                       for d, w in evals.items()},
        "size": sizes,
        "perplexity": {"dense": m.dense_ppl, "pruned": m.pruned_ppl},
    }
    if args.recover_tokens:
        if args.compare_lora:
            result["recovery_comparison"] = _compare_lora(args, model, m.recovery.windows, setup, evals)
        result["recovery"], result["perplexity"]["recovered"] = recover_and_measure(
            args, m, groups=args.group_finetune_groups)
    if m.zero_shot is not None:
        result["zero_shot"] = m.zero_shot_report()
    if args.speed:
        setup.dense.restore()
        result["speed"] = speed_report(setup.model, model)
    result["per_layer"] = {str(k): v for k, v in per_layer_sizes(model).items()}
    result["timings_s"] = {k: round(v, 2) for k, v in timings.items()} | {"total": round(time.perf_counter() - m.t0, 2)}
    result["provenance"] = m.provenance
    _write(args, model, setup.tokenizer, result)
    return result


def _compare_lora(args: argparse.Namespace, model, train, setup, evals: dict) -> dict:
    """Plain LoRA on a copy at the group fine-tuning's budget and trainable-parameter count."""
    twin, report = compare_with_lora(model, train, tokens=args.recover_tokens, groups=args.group_finetune_groups,
                                     lr=args.recover_lr, seed=args.calib_seed,
                                     val_windows=setup.fitness_windows(RECOVERY_VALID_WINDOWS))
    report["perplexity"] = {d: perplexity(twin, w, progress=True) for d, w in evals.items()}
    return report


def _write(args: argparse.Namespace, model, tokenizer, result: dict) -> None:
    def fill(tmp: Path) -> None:
        if not args.no_save_model:
            save_pruned(model, tmp, tokenizer=tokenizer, per_layer=per_layer_sizes(model))
        write_json_atomic(tmp / REPORT, result)

    write_out_dir(args.out, fill)


def summary(result: dict) -> str:
    size = result["size"]
    lines = [f"kept {size['achieved_keep']:.4f} of decoder parameters (target {size['target_keep']}); "
             f"parameters {size['params']['dense']:,} -> {size['params']['pruned']:,}"]
    for data, ppl in result["perplexity"]["pruned"].items():
        dense = result["perplexity"]["dense"].get(data)
        rec = result["perplexity"].get("recovered", {}).get(data)
        lines.append(f"{data:<10} " + (f"dense {dense:.3f}  " if dense is not None else "")
                     + f"pruned {ppl:.3f}" + (f"  recovered {rec:.3f}" if rec is not None else ""))
    for data, ppl in result.get("recovery_comparison", {}).get("perplexity", {}).items():
        lines.append(f"{data:<10} plain LoRA (rank {result['recovery_comparison']['lora_rank']}) recovered {ppl:.3f}")
    if "speed" in result:
        s = result["speed"]
        lines.append(f"speed-up prefill {s['prefill_speedup']:.2f}x, decode {s['decode_speedup']:.2f}x "
                     f"(FLOPs ratio {s['flops_ratio']:.2f}x)")
    return "\n".join(lines + zero_shot_lines(result))
