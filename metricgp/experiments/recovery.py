"""`python -m metricgp.experiments.recovery`: test perplexity against recovery tokens, for pruning pipelines x
recovery losses, into results/recovery/ (results.json, table.md, curve.png).

    python -m metricgp.experiments.recovery --out results/recovery            # make recovery: the whole grid
    python -m metricgp.experiments.recovery --pipelines sparsegpt,flap --losses kd --out results/recovery
    python -m metricgp.experiments.recovery --max-tokens 2048 --pipelines wanda-reconstruct --out /tmp/rec  # a check

One row per pipeline x loss x method, one row at a time. A row prunes as `python -m metricgp.apply` does
(the model loaded afresh, so nothing of an earlier row remains), with the same options: each pipeline *is*
a list of apply options, and the row records the apply command that reproduces its last point. Without a
single --lrs value the lr is chosen first: each candidate trains --lr-choice-tokens from the same pruned
model and the lowest validation perplexity (WikiText-2 validation, never a test split) wins. Then one
run trains to --max-tokens and at every checkpoint measures test perplexity on the first --eval-windows
windows of --seqlen tokens of each --dataset (results/structured/table.md's protocol), next to the
recovery's own validation perplexity. results.json, table.md and curve.png are rewritten after every
checkpoint; a finished row is skipped on a rerun, and an interrupted one continues from its last
checkpoint (weights, optimizer, step and RNG under --state-dir, not committed) to the result it would
have had.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from metricgp.cli import apply as unstructured_cli
from metricgp.cli import structured as structured_cli
from metricgp.cli.options import add_model_data_options, recover_and_measure
from metricgp.errors import MetricGPError, cli_entry
from metricgp.experiments.rows import commands, earlier, load_rows, save_rows
from metricgp.measure import perplexity
from metricgp.plotting import pyplot, save_figure
from metricgp.recover import RECOVERY_METHODS, SCHEDULES, get_loss, sparse_masks

# RIA with X^1/2 in place of X^1/4: the long search's best new form, lowest one-shot at 2:4 (results/README.md)
RIA_SQRT = "mul(add(rownorm(abs(W)), colnorm(abs(W))), sqrt(X))"


@dataclass(frozen=True)
class Pipeline:
    about: str
    family: str  # what its rows are ranked against: pipelines that remove as much, the same kind of way
    options: tuple[str, ...]  # what `python -m metricgp.apply` is given to prune this way


S70, S60, U50, NM24 = "structured 70%", "structured 60%", "unstructured 50%", "2:4"
# The DarwinLM level search's best winner at 60% (results/darwin/compare.md): its best.json is a keep map
DARWIN_WINNER = "results/darwin-k60-ls/best.json"

PIPELINES: dict[str, Pipeline] = {
    "evolved-refit": Pipeline("structured, 70% kept: the evolved formula, least-squares refit of output projections",
                              S70, ("--structured", "--method", "evolved-refit", "--keep", "0.7")),
    "wanda-refit": Pipeline("structured, 70% kept: wanda with the refit", S70,
                            ("--structured", "--method", "wanda-refit", "--keep", "0.7")),
    "flap": Pipeline("structured, 70% kept: FLAP", S70, ("--structured", "--method", "flap", "--keep", "0.7")),
    "llm-pruner-taylor": Pipeline("structured, 70% kept: LLM-Pruner's Taylor importance", S70,
                                  ("--structured", "--method", "llm-pruner-taylor", "--keep", "0.7")),
    "darwin-winner": Pipeline(f"structured, 60% kept: the DarwinLM search's winner ({DARWIN_WINNER}, its keep "
                              "map per module), the evolved formula with the refit", S60,
                              ("--structured", "--method", "evolved-refit", "--keep", "0.6", "--keep-map",
                               DARWIN_WINNER)),
    "evolved-uniform": Pipeline("structured, 60% kept: the evolved formula, the same ratio in every module (what "
                                "DarwinLM's search is compared with)", S60,
                                ("--structured", "--method", "evolved-uniform", "--keep", "0.6")),
    "evolved-uniform-refit": Pipeline("structured, 60% kept: evolved-uniform with the refit (the darwin winner's "
                                      "pruning without its per-module levels)", S60,
                                      ("--structured", "--method", "evolved-uniform", "--refit", "--keep", "0.6")),
    "sparsegpt": Pipeline("unstructured 50%: SparseGPT's saliency, sequential, least-squares update of the kept "
                          "weights", U50, ("--metric", "sparsegpt", "--mode", "reconstruct", "--sparsity", "0.5")),
    "wanda-reconstruct": Pipeline("unstructured 50%: wanda, sequential, least-squares update of the kept weights",
                                  U50, ("--metric", "wanda", "--mode", "reconstruct", "--sparsity", "0.5")),
    "ria-sqrt": Pipeline("unstructured 50%: RIA with sqrt(X), one-shot", U50,
                         ("--metric", RIA_SQRT, "--sparsity", "0.5")),
    "sparsegpt-2:4": Pipeline("2:4: SparseGPT's saliency with the least-squares update", NM24,
                              ("--metric", "sparsegpt", "--mode", "reconstruct", "--pattern", "2:4")),
    "ria-sqrt-2:4": Pipeline("2:4: RIA with sqrt(X), one-shot", NM24, ("--metric", RIA_SQRT, "--pattern", "2:4")),
}
# full: 1e-4 won the first grid (1e-5..1e-4) at its edge, then 3e-4 won over 1e-4 (ria-sqrt, KD, 2,048 tokens;
# results/recovery/results.json `lr_choice`): the grid reaches past the last winner
LR_GRIDS = {"full": "3e-5,1e-4,3e-4,1e-3", "lora": "1e-4,3e-4,1e-3"}
CHECKPOINTS = "16384,32768,65536,131072,262144"


def apply_argv(args: argparse.Namespace, pipeline: str, loss: str, lr: float, tokens: int) -> list[str]:
    """The `python -m metricgp.apply` arguments of one row (shared options only where not the default)."""
    parser = unstructured_cli.build_parser()
    shared = [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in ("model", "dtype", "device", "calib", "n_calib",
                                                                      "seqlen", "calib_seed")]
    argv = [*PIPELINES[pipeline].options]
    argv += [str(x) for flag, v in shared if v != parser.get_default(flag[2:].replace("-", "_")) for x in (flag, v)]
    argv += ["--dataset", args.dataset, "--eval-windows", str(args.eval_windows), "--recover-tokens", str(tokens),
             "--recover-method", args.recover_method, "--recover-loss", loss, "--recover-lr", f"{lr:g}",
             "--recover-schedule", args.schedule, "--recover-warmup", f"{args.warmup:g}",
             "--out", f"runs/recovery/{slug(args_key(args, pipeline, loss))}"]
    return argv


def parsed(argv: list[str]) -> argparse.Namespace:
    parser = unstructured_cli.build_parser()
    ns = parser.parse_args(argv)
    unstructured_cli.check_mode(parser, ns)
    ns.overwrite = True  # the driver writes nothing there; a user who ran the command before must not stop it
    return ns


def measure(ns: argparse.Namespace):
    """Load, prune and measure exactly as `apply` does; returns its `Measured`."""
    return (structured_cli.measure if ns.structured else unstructured_cli.measure)(ns)[0]


def row_key(pipeline: str, loss: str, method: str, schedule: str = "constant", max_tokens: int = 0) -> str:
    """A row's identity. A constant lr's points are what a shorter run gives, so one row serves every budget;
    a decaying schedule's row is another row for each budget it decays over."""
    return f"{pipeline}|{loss}|{method}" + ("" if schedule == "constant" else f"|{schedule}-{token_label(max_tokens)}")


def args_key(args: argparse.Namespace, pipeline: str, loss: str) -> str:
    return row_key(pipeline, loss, args.recover_method, args.schedule, args.max_tokens)


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", key)


def choose_lr(args: argparse.Namespace, pipeline: str, loss: str, row: dict, save) -> float:
    """The lr of `args.lrs` with the lowest validation perplexity after --lr-choice-tokens (each from the same
    pruned model); every candidate's result is saved as it comes, so a rerun only runs the missing ones."""
    if len(args.lrs) == 1:
        return args.lrs[0]
    tried = row.setdefault("lr_choice", {})
    for lr in args.lrs:
        if f"{lr:g}" in tried:
            continue
        ns = parsed(apply_argv(args, pipeline, loss, lr, args.lr_choice_tokens))
        ns.eval_windows, ns.no_dense_eval = 1, True  # the choice reads validation text only
        m = measure(ns)
        rec, _ = recover_and_measure(ns, m, None if ns.structured else sparse_masks(m.model))
        tried[f"{lr:g}"] = rec["val_ppl_after"]
        print(f"{args_key(args, pipeline, loss)}: lr {lr:g} -> validation ppl "
              f"{rec['val_ppl_after']:.3f} after {rec['tokens']} tokens", flush=True)
        save(tables=False)
    best = min(args.lrs, key=lambda lr: _finite(tried[f"{lr:g}"]))
    return best


def _finite(x: float | None) -> float:
    return math.inf if x is None or not math.isfinite(x) else x


def run_row(args: argparse.Namespace, pipeline: str, loss: str, rows: dict, save) -> None:
    key = args_key(args, pipeline, loss)
    row = rows.setdefault(key, {"pipeline": pipeline, "about": PIPELINES[pipeline].about, "loss": loss,
                                "method": args.recover_method, "schedule": args.schedule, "warmup": args.warmup,
                                "points": []})
    if row.get("done"):
        return
    t0 = time.perf_counter()
    if "lr" not in row:
        row["lr"] = choose_lr(args, pipeline, loss, row, save)
        save(tables=False)
    argv = apply_argv(args, pipeline, loss, row["lr"], args.max_tokens)
    row["command"] = "python -m metricgp.apply " + shlex.join(argv)
    ns = parsed(argv)
    m = measure(ns)
    row["oneshot"] = m.pruned_ppl
    row["size"] = ({"achieved_keep": m.outcome["achieved_keep"]} if ns.structured
                   else {"sparsity": m.outcome.sparsity})
    row["dense"] = m.dense_ppl

    def on_checkpoint(tokens: int, model, point: dict) -> None:
        test = {d: perplexity(model, w) for d, w in m.evals.items()}
        row["points"] = [p for p in row["points"] if p["tokens"] < tokens] + [{**point, "test": test}]
        print(f"{key} {tokens:>8} tokens: " + "  ".join(f"{d} {v:.2f}" for d, v in test.items())
              + f"  (validation {point['val_ppl']:.2f})", flush=True)
        save()

    state = args.state_dir / f"{slug(key)}.pt"
    rec, final = recover_and_measure(ns, m, None if ns.structured else sparse_masks(m.model),
                                     groups=ns.group_finetune_groups, checkpoints=args.checkpoints,
                                     on_checkpoint=on_checkpoint, state_path=state)
    row["final"] = final  # after the merge, in the model's dtype: what apply's report gives
    row["recovery"] = {k: v for k, v in rec.items() if k != "curve"}
    row["tokens_per_second"] = rec["tokens_per_second"]
    row["seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
    row["done"] = True
    save()
    state.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> None:
    path = args.out / "results.json"
    rows = load_rows(path)
    meta = earlier(path) | {
        "what": "test perplexity of pruned models against recovery training tokens",
        "protocol": {"eval_windows": args.eval_windows, "seqlen": args.seqlen, "dataset": args.dataset,
                     "train_data": args.calib, "train_seed": args.calib_seed + 1, "max_tokens": args.max_tokens,
                     "checkpoints": args.checkpoints, "lr_choice_tokens": args.lr_choice_tokens, "lrs": args.lrs,
                     "validation": "WikiText-2 validation, 8 windows (apply's recovery report)"},
        "pipelines": {p: PIPELINES[p].about for p in args.pipelines},
        "commands": commands(path)}

    def save(tables: bool = True) -> None:
        dense = next((r["dense"] for r in rows.values() if r.get("dense")), meta.get("dense_ppl", {}))
        meta["dense_ppl"] = dense
        save_rows(path, rows, meta)
        if tables:
            write_table(args.out, meta, rows)

    for pipeline in args.pipelines:  # an earlier row continues only as it began
        for loss in args.losses:
            row = rows.get(args_key(args, pipeline, loss), {})
            if row.get("warmup", args.warmup) != args.warmup:
                raise MetricGPError(f"row {args_key(args, pipeline, loss)} in {path} was trained with --warmup "
                                    f"{row['warmup']:g}, not {args.warmup:g}: give another --out")
    for pipeline in args.pipelines:
        for loss in args.losses:
            run_row(args, pipeline, loss, rows, save)
    save()


def token_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def write_table(out: Path, meta: dict, rows: dict) -> None:
    """table.md (one table per dataset: test perplexity at each checkpoint) and curve.png."""
    datasets = [d for d in meta["protocol"]["dataset"].split(",") if d]
    marks = sorted({p["tokens"] for r in rows.values() for p in r.get("points", [])})
    dense = meta.get("dense_ppl", {})
    proto = meta["protocol"]
    lines = ["# Recovery of pruned SmolLM2-135M-Instruct: test perplexity against training tokens", "",
             f"Test perplexity on the first {proto['eval_windows']} windows of {proto['seqlen']} tokens of each test "
             f"split (as results/structured/table.md); recovery on {proto['train_data']} calibration windows (train "
             f"split, seed {proto['train_seed']}), up to {proto['max_tokens']:,} tokens, one run per row evaluated at "
             "each checkpoint; " + (f"lr {proto['lrs'][0]:g} for every row (given, not chosen)"
                                    if len(proto.get("lrs", ())) == 1 else
                                    "the lr of each row chosen by validation perplexity after "
                                    f"{proto['lr_choice_tokens']:,} tokens (`lr_choice` in results.json)")
             + ". 0 tokens: one-shot.", "",
             "Dense: " + ", ".join(f"{d} {v:.2f}" for d, v in dense.items()), "",
             "Made by: " + "; then ".join(f"`{c}`" for c in meta.get("commands", [])) + ". Each row of results.json "
             "has the `apply` command that reproduces its last point.", ""]
    for d in datasets:
        head = ["pipeline", "loss", "method", "lr", "0", *[token_label(t) for t in marks], "tokens/s"]
        lines += [f"## {d}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows.values():
            at = {p["tokens"]: p["test"].get(d) for p in r.get("points", [])}
            cells = [r["pipeline"], r["loss"], method_label(r), f"{r['lr']:g}" if "lr" in r else "",
                     _fmt(r.get("oneshot", {}).get(d)), *[_fmt(at.get(t)) for t in marks],
                     f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else "running"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ranking_lines(rows, datasets[0] if datasets else "wikitext2")
    lines += ["Pipelines:", ""] + [f"- `{p}`: {about}" for p, about in meta.get("pipelines", {}).items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(out / "curve.png", rows, datasets, dense)


def ranking_lines(rows: dict, data: str) -> list[str]:
    """Per family and loss: the pipelines in one-shot order and in order after recovery (the largest token
    count every one of them reached), on `data`'s test perplexity, and whether the orders agree."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows.values():
        if r.get("points") and r["pipeline"] in PIPELINES:
            # rows of one schedule are ranked together
            groups.setdefault((PIPELINES[r["pipeline"]].family, r["loss"] + _decaying(r)), []).append(r)
    lines = []
    for (fam, loss), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        tokens = min(max(p["tokens"] for p in r["points"]) for r in members)

        def after(r: dict, tokens: int = tokens) -> float:
            return next(p["test"][data] for p in r["points"] if p["tokens"] == tokens)

        if any(not any(p["tokens"] == tokens for p in r["points"]) for r in members):
            continue
        before = sorted(members, key=lambda r: r["oneshot"][data])
        recovered = sorted(members, key=after)
        lines.append(f"| {fam} | {loss} | {token_label(tokens)} | "
                     + " < ".join(f"{r['pipeline']} {r['oneshot'][data]:.1f}" for r in before) + " | "
                     + " < ".join(f"{r['pipeline']} {after(r):.1f}" for r in recovered) + " | "
                     + ("yes" if [r["pipeline"] for r in before] == [r["pipeline"] for r in recovered] else "no")
                     + " |")
    if not lines:  # no family with two rows: nothing to rank
        return []
    return ["## Does recovery keep the one-shot ranking?", "",
            f"{data} test perplexity, one run per row (no seed spread measured, so an order decided by a few percent "
            "may be noise).", "",
            "| family | loss | tokens | one-shot order | order after recovery | same? |", "|---|---|---:|---|---|---|",
            *lines, ""]


def _decaying(row: dict) -> str:
    """", cosine" for a row whose lr decays; "" for a constant lr (the rows of older tables)."""
    schedule = row.get("schedule", "constant")
    return "" if schedule == "constant" else f", {schedule}"


def method_label(row: dict) -> str:
    return row["method"] + _decaying(row)


def _fmt(x: float | None) -> str:
    return "" if x is None else ("inf" if not math.isfinite(x) else f"{x:.2f}")


def _plot(path: Path, rows: dict, datasets: list[str], dense: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    pipelines = sorted({r["pipeline"] for r in rows.values()})
    for ax, d in zip(axes[0], datasets, strict=True):
        for r in rows.values():
            points = [(p["tokens"], p["test"][d]) for p in r.get("points", []) if p["tokens"] > 0]
            if not points:
                continue
            style = "-o" if r["loss"] == "ce" else ("--s" if r["loss"] == "kd" else ":^")
            ax.plot(*zip(*points, strict=True), style, ms=3, color=colours(pipelines.index(r["pipeline"]) % 10),
                    label=f"{r['pipeline']} {r['loss']} ({method_label(r)})")
        if d in dense:
            ax.axhline(dense[d], color="black", lw=0.8, label="dense")
        if not ax.lines:
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("recovery tokens (log)")
        ax.set_ylabel(f"{d} test perplexity (log)")
        ax.grid(alpha=0.3, which="both")
    if axes[0][0].lines:
        axes[0][0].legend(fontsize=6)
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.experiments.recovery", description=__doc__.split("\n")[0],
                                epilog="pipelines: " + "; ".join(f"{k}: {v.about}" for k, v in PIPELINES.items()))
    p.add_argument("--out", type=Path, default=Path("results/recovery"))
    p.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated (default: all)")
    p.add_argument("--losses", default="ce,kd", help="comma-separated recovery losses (default ce,kd)")
    p.add_argument("--recover-method", default="full", help="full (default) or lora; both keep an unstructured "
                   "model's zeros")
    p.add_argument("--max-tokens", type=int, default=262144, help="recovery budget of every row (default 262144)")
    p.add_argument("--checkpoints", default=CHECKPOINTS, help=f"token counts evaluated (default {CHECKPOINTS}; "
                   "those above --max-tokens are dropped, --max-tokens is always one)")
    p.add_argument("--lrs", default=None, help="learning rates to choose from on validation text (default per "
                   f"method: {LR_GRIDS}); one value: no choice")
    p.add_argument("--lr-choice-tokens", type=int, default=16384, help="the choice's budget (default 16384)")
    p.add_argument("--schedule", default="constant", help=f"{', '.join(SCHEDULES)} (default constant: the curve's "
                   "points are then what a shorter run would give)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with linear warmup (default 0.05)")
    p.add_argument("--state-dir", type=Path, default=Path("runs/recovery-state"),
                   help="where an unfinished row keeps its resumable state (default runs/recovery-state)")
    p.add_argument("--dataset", default="wikitext2,c4,ptb", help="test data (default wikitext2,c4,ptb)")
    p.add_argument("--eval-windows", type=int, default=8, help="test windows per dataset (default 8)")
    add_model_data_options(p)
    return p


def check(args: argparse.Namespace) -> argparse.Namespace:
    args.pipelines = [x.strip() for x in args.pipelines.split(",") if x.strip()]
    args.losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    unknown = [x for x in args.pipelines if x not in PIPELINES]
    if unknown or not args.pipelines:
        raise MetricGPError(f"unknown pipelines {unknown} (choose from {', '.join(PIPELINES)})")
    for loss in args.losses:
        get_loss(loss)
    if args.recover_method not in RECOVERY_METHODS:
        raise MetricGPError(f"--recover-method must be one of {', '.join(RECOVERY_METHODS)}")
    if args.max_tokens < 1 or args.lr_choice_tokens < 1:
        raise MetricGPError("--max-tokens and --lr-choice-tokens must be at least 1")
    try:
        args.lrs = [float(x) for x in (args.lrs or LR_GRIDS[args.recover_method]).split(",") if x.strip()]
        marks = [int(x) for x in args.checkpoints.split(",") if x.strip()]
    except ValueError:
        raise MetricGPError("--lrs and --checkpoints are comma-separated numbers") from None
    args.checkpoints = sorted({t for t in marks if t <= args.max_tokens} | {args.max_tokens})
    if not args.lrs or min(args.lrs) < 0:
        raise MetricGPError("--lrs must be non-negative learning rates")
    # every row's apply command must be valid before anything runs
    for pipeline in args.pipelines:
        for loss in args.losses:
            ns = parsed(apply_argv(args, pipeline, loss, args.lrs[0], args.max_tokens))
            (structured_cli.validate if ns.structured else unstructured_cli.validate)(ns)
    return args


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = check(build_parser().parse_args(argv))
    run(args)
    print(f"wrote {args.out}/results.json, table.md and curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
