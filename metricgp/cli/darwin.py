"""`python -m metricgp.darwin`: DarwinLM structured level search, or EvoPress unstructured.

    python -m metricgp.darwin --keep 0.6 --metric-file results/smollm2-default-s0/best.json \\
        --offspring 16 --generations 50 --out results/darwin-k60
    python -m metricgp.darwin --resume results/darwin-k60 --generations 80
    python -m metricgp.darwin --resume results/evo-unstructured-60 --generations 2 --reconstruct
        # at its last generation: only the final report again, now with the reconstruct rows
    python -m metricgp.darwin --keep 0.6 --survivors 4,2,1 --fitness-windows 2,4,8 \\
        --train-tokens 2k,4k,8k --out results/darwin-k60-trained        # training-aware selection
    python -m metricgp.darwin --unstructured --sparsity 0.7 --metric wanda --out results/evo-unstructured-70
    python -m metricgp.darwin --resume results/darwin-k60 --zero-shot arc_easy,arc_challenge,hellaswag,piqa,winogrande
        # at its last generation: the final report again, with zero-shot accuracy (EvoPress's tasks)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metricgp.cli.options import (
    add_backend_options,
    add_model_data_options,
    add_recovery_options,
    add_zero_shot_options,
    backend_fields,
    metric_from_args,
    model_data_fields,
    resume_overrides,
)
from metricgp.darwin.config import DarwinConfig
from metricgp.darwin.database import DEFAULT_LEVELS
from metricgp.darwin.run import RESUMABLE, resume, start
from metricgp.darwin.stages import make_schedule, schedule_dict
from metricgp.darwin.unstructured import DEFAULT_LEVELS as UNSTRUCTURED_LEVELS
from metricgp.errors import MetricGPError, cli_entry
from metricgp.evaluate import FITNESSES
from metricgp.expr import to_functional
from metricgp.expr.builtins import EVOLVED
from metricgp.provenance import provenance
from metricgp.recover import LOSSES
from metricgp.structured.evaluator import StructuredSpec
from metricgp.structured.recover import RECOVERY_METHODS
from metricgp.zeroshot import zero_shot_lines

DESCRIPTION = ("DarwinLM level search: a database of per-module pruning levels ordered by a metric, searched by "
               "(1+lambda) evolution on KL to the dense model; --unstructured: EvoPress per-layer sparsity.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.darwin", description=DESCRIPTION,
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="run directory (checkpoint, log, plots, final model)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its checkpoint")
    t = p.add_argument_group("target and database")
    t.add_argument("--keep", type=float, default=0.6, help="structured: fraction of decoder parameters kept")
    t.add_argument("--unstructured", action="store_true", help="EvoPress: per-layer unstructured sparsity levels")
    t.add_argument("--sparsity", type=float, default=0.7, help="--unstructured: fraction of weights removed")
    t.add_argument("--metric", help="importance: a built-in metric, taylor (|W|*G), or a formula")
    t.add_argument("--metric-file", type=Path, help="a search's best.json (default, with no --metric "
                   "either: the default search's best formula, metricgp.expr.builtins.EVOLVED)")
    t.add_argument("--levels", type=int, help=f"levels per module (default {DEFAULT_LEVELS}; "
                   f"--unstructured: {UNSTRUCTURED_LEVELS}, i.e. 5%% steps)")
    for opt, default in (("reduction", StructuredSpec.reduction), ("normalisation", StructuredSpec.normalisation),
                         ("head-mode", StructuredSpec.head_mode)):
        t.add_argument(f"--{opt}", default=default, help=f"unit importance {opt} (default {default})")
    t.add_argument("--update", default="none", help="structured: weight update at each level: none (zeroed "
                   "columns) or ls (least-squares refit of the output projection on calibration inputs)")
    s = p.add_argument_group("search")
    s.add_argument("--offspring", type=int, default=16, help="lambda: offspring per generation (default 16)")
    s.add_argument("--generations", type=int, default=50)
    s.add_argument("--search-seed", type=int, default=0, help="seed of the mutation's random choices")
    s.add_argument("--survivors", default="4,1", help="survivors per stage, down to 1 (default 4,1)")
    s.add_argument("--fitness-windows", default="2,8", help="fitness windows per stage (default 2,8)")
    s.add_argument("--train-tokens", default=None,
                   help="in-loop fine-tuning tokens per stage before scoring, e.g. 2k,4k,8k (default none)")
    s.add_argument("--train-method", default="lora", help="in-loop training: lora (default: an adapter per "
                   "candidate, merged; memory of the model plus the adapter) or full (DarwinLM's, lr 1e-5: an fp32 "
                   "copy and AdamW state, about 110 GB at 8B)")
    s.add_argument("--train-lr", type=float, default=None)
    s.add_argument("--train-loss", default="ce", help=f"in-loop training loss: {', '.join(LOSSES)} (kd: KL to the "
                   "dense model's top-k on the training windows, taken once before any pruning; default ce)")
    s.add_argument("--fitness", choices=tuple(FITNESSES), default="kl")
    s.add_argument("--fitness-data", default=None, help="calibration data for fitness and training windows "
                   "(default: --calib; never a test split)")
    s.add_argument("--no-prior", action="store_true", help="no metric prior: uniform start, unbiased mutation, "
                   "no screening (the predicted-vs-measured correlation is still logged)")
    s.add_argument("--screen", type=int, default=0, help="with the prior: offspring sent to the first stage, "
                   "lowest predicted loss first (default 0: all; the prediction ranked offspring against their KL "
                   "in every measured run, and screening half of them gave a worse search)")
    s.add_argument("--time-budget", type=float, metavar="MIN", help="stop after the generation exceeding it")
    add_backend_options(p)
    add_zero_shot_options(p)
    f = p.add_argument_group("final model")
    add_recovery_options(f, methods=tuple(RECOVERY_METHODS))
    f.add_argument("--dataset", default="wikitext2", help="comma-separated test data for the final report")
    f.add_argument("--eval-windows", type=int, default=32, help="test windows (0: all; default 32)")
    f.add_argument("--no-save-model", action="store_true")
    f.add_argument("--no-dense-eval", action="store_true", help="skip the dense model's test perplexity")
    f.add_argument("--reconstruct", action="store_true", help="--unstructured: also score uniform, OWL and the "
                   "winner with sequential pruning + least-squares reconstruction of the kept weights")
    f.add_argument("--no-speed", action="store_true", help="structured: skip timing the final model against dense")
    add_model_data_options(p)
    p.add_argument("--no-progress", action="store_true")
    return p


def importance_metric(args: argparse.Namespace) -> tuple[str, str]:
    """(functional formula, where it came from)."""
    if args.metric is None and args.metric_file is None:
        return EVOLVED, "the default: the default search's best formula (metricgp.expr.builtins.EVOLVED)"
    tree, source = metric_from_args(args)
    return to_functional(tree), source


def config_from_args(args: argparse.Namespace) -> DarwinConfig:
    if args.out is None:
        raise MetricGPError("--out is required (or --resume DIR)")
    metric, source = importance_metric(args)
    stages = make_schedule(args.survivors, args.fitness_windows, args.train_tokens)
    if getattr(args, "offload", False) and any(stage.train_tokens for stage in stages):
        raise MetricGPError("--train-tokens trains with every block on the device; with --offload the search runs "
                            "without in-loop training")
    screen = None if args.no_prior or not args.screen else args.screen
    levels = args.levels if args.levels is not None else (UNSTRUCTURED_LEVELS if args.unstructured else DEFAULT_LEVELS)
    return DarwinConfig(
        spec=model_data_fields(args), metric=metric, metric_source=source, unstructured=args.unstructured,
        keep=args.keep, sparsity=args.sparsity, levels=levels, reduction=args.reduction,
        normalisation=args.normalisation, head_mode=args.head_mode, stages=tuple(schedule_dict(stages)),
        offspring=args.offspring, generations=args.generations, seed=args.search_seed, prior=not args.no_prior,
        screen=screen, fitness=args.fitness, fitness_data=args.fitness_data or args.calib,
        train_method=args.train_method, train_lr=args.train_lr, train_loss=args.train_loss, **backend_fields(args),
        time_budget_min=args.time_budget, recover_tokens=args.recover_tokens, recover_method=args.recover_method,
        recover_lr=args.recover_lr, recover_loss=args.recover_loss, recover_schedule=args.recover_schedule,
        recover_warmup=args.recover_warmup, recover_checkpointing=args.recover_checkpointing,
        dataset=args.dataset, eval_windows=args.eval_windows,
        save_model=not args.no_save_model, dense_eval=not args.no_dense_eval, speed=not args.no_speed,
        reconstruct=args.reconstruct, update=args.update, zero_shot=args.zero_shot,
        zero_shot_limit=args.zero_shot_limit, zero_shot_batch_size=args.zero_shot_batch_size,
        name=args.out.name).validate()


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.resume is not None:
        out = args.resume
        overrides = resume_overrides(parser, args, RESUMABLE)
        search = resume(out, overrides, progress=progress, provenance=provenance())
    else:
        config = config_from_args(args)
        out = args.out
        search = start(config, out, provenance(), progress=progress)
    print(f"best: kept {search.space.kept_fraction(search.parent):.4f}, fitness {search.fitness:.6g} "
          f"after {search.gen} generations -> {out}/best.json, {out}/levels.txt")
    report = out / "report.json"
    if report.is_file():
        print("\n".join(zero_shot_lines(json.loads(report.read_text(encoding="utf-8")))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
