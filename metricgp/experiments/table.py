"""`experiments table`: every structured method x keep level, one-shot and recovered, into
<out>/table.json, then table.md and table.png (`report.write_table`)."""

from __future__ import annotations

import json
import time

from metricgp.experiments.report import write_table
from metricgp.experiments.rows import (
    commands,
    earlier,
    evaluation_windows,
    load_rows,
    metric_tree,
    perplexities,
    pruning_setup,
    row_command,
    save_rows,
    size_fields,
    train_windows,
)
from metricgp.structured.evaluator import StructuredSpec, prune, speed_report
from metricgp.structured.methods import METHODS, get_method
from metricgp.structured.recover import recover


def run_table(args) -> None:
    """Every method x keep level one-shot; then, at the recovery keep levels, after the same
    recovery budget (a second pass, so the cheap one-shot table is complete first)."""
    path = args.out / "table.json"
    rows = load_rows(path)
    setup = pruning_setup(args)
    evals, dense = evaluation_windows(setup, args)
    before = earlier(path)
    meta = before | {"what": "structured pruning of the default model: test perplexity, size and speed",
            "dense_ppl": dense, "eval_windows": args.eval_windows, "seqlen": args.seqlen,
            "recover_tokens": args.recover_tokens,
            "recover_keeps": sorted(set(before.get("recover_keeps", [])) | set(args.recover_keeps), reverse=True),
            "methods": before.get("methods", {}) | {m: METHODS[m].about for m in args.methods},
            "commands": commands(path)}
    started = time.perf_counter()

    def pruned(method: str, keep: float):
        m = get_method(method)
        setup.dense.restore()
        return prune(setup, metric_tree(m.metric), StructuredSpec(keep=keep, **m.spec))

    for keep, method in ((k, m) for k in args.keeps for m in args.methods):
        key = f"{method}|{keep}"
        if key in rows:
            continue
        t0 = time.perf_counter()
        model, sizes = pruned(method, keep)
        row = {"method": method, "keep": keep, **size_fields(sizes), "oneshot": perplexities(model, evals),
               "command": row_command(method, keep, args, False)}
        if args.speed:
            setup.dense.restore()
            row["speed"] = speed_report(setup.model, model)
        rows[key] = row | {"seconds": round(time.perf_counter() - t0, 1)}
        print(f"{key:<28} " + " ".join(f"{d} {v:9.2f}" for d, v in row["oneshot"].items()), flush=True)
        save_rows(path, rows, meta)
    if args.recover_tokens:
        train = train_windows(setup, args)
        for keep, method in ((k, m) for k in args.recover_keeps for m in args.methods):
            row = rows[f"{method}|{keep}"]
            if "recovered" in row:
                continue
            t0 = time.perf_counter()
            model, _ = pruned(method, keep)
            row["recovery"] = recover(model, train, tokens=args.recover_tokens, seed=args.calib_seed).to_dict()
            row["recovered"] = perplexities(model, evals)
            row["command_recovered"] = row_command(method, keep, args, True)
            row["seconds_recovery"] = round(time.perf_counter() - t0, 1)
            print(f"{method}|{keep:<20} recovered " + " ".join(f"{v:9.2f}" for v in row["recovered"].values()),
                  flush=True)
            save_rows(path, rows, meta)
    meta["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    save_rows(path, rows, meta)
    write_table(args.out, json.loads(path.read_text()))
