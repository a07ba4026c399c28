"""The drivers' shared table I/O (a JSON table, written after every row, so a rerun resumes) and what
every structured row needs: session, test windows, sizes, perplexities, its `apply` command."""

from __future__ import annotations

import json
from pathlib import Path

from metricgp.cli.options import evaluator_spec
from metricgp.data import parse_report_data
from metricgp.evaluate import PruningSetup, cached_dense_perplexity
from metricgp.expr import resolve_metric
from metricgp.measure import perplexity
from metricgp.provenance import command_line, write_json_atomic
from metricgp.recover import training_windows


def load_rows(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else {}


def earlier(path: Path) -> dict:
    """What earlier invocations wrote to the table besides its rows (commands, methods)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "rows"} if path.is_file() else {}


def save_rows(path: Path, rows: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**meta, "rows": rows})


def pruning_setup(args):
    return PruningSetup.from_spec(evaluator_spec(args), grads=True)


def evaluation_windows(setup, args) -> tuple[dict, dict]:
    """The first `--eval-windows` test windows of every `--dataset`, and the dense model's perplexity
    on them (cached on disk)."""

    evals = {d: setup.report_windows(d, args.eval_windows) for d in parse_report_data(args.dataset)}
    return evals, {d: cached_dense_perplexity(setup, d, w) for d, w in evals.items()}


def size_fields(sizes: dict) -> dict:
    """What a row records of a pruned model's size (`prune`'s report)."""
    return {"achieved_keep": sizes["achieved_keep"], "params": sizes["params"]["pruned"],
            "decoder_params": sizes["decoder_params"]["pruned"]}


def perplexities(model, evals: dict) -> dict[str, float]:
    return {d: perplexity(model, w) for d, w in evals.items()}


def train_windows(setup, args):
    """Recovery training windows: the calibration source (train split), the next seed, enough for
    `--recover-tokens` (as `apply --recover-tokens` draws them)."""
    return training_windows(args.calib, setup.tokenizer, args.seqlen, args.recover_tokens, args.calib_seed + 1)


def commands(path: Path) -> list[str]:
    """The commands of every invocation that wrote `path`, this one last."""
    before = earlier(path)
    return [c for c in before.get("commands", [before.get("command")]) if c] + [this_command()]


def metric_tree(metric: str | None):
    """A method's metric (a name, a formula or a JSON file) as a tree; None for a non-metric method."""
    return None if metric is None else resolve_metric(metric)


def this_command() -> str:
    return command_line()


def row_command(method: str, keep: float, args, recover: bool, options: tuple[str, ...] = (), name: str = "") -> str:
    """The `python -m metricgp.apply` command that reproduces a row: the method preset, then `options`
    (the recovery given by `options` when it is not the plain `--recover-tokens`)."""
    parts = ["python -m metricgp.apply --structured", f"--method {method}", *options, f"--keep {keep}",
             f"--dataset {args.dataset}", f"--eval-windows {args.eval_windows}", f"--n-calib {args.n_calib}"]
    if args.calib_seed:
        parts.append(f"--calib-seed {args.calib_seed}")
    if recover:
        parts.append(f"--recover-tokens {args.recover_tokens}")
    return " ".join(parts + [f"--out runs/{name or method}-{int(keep * 100)}"])
