"""`make bench-scale`: peak resident memory of each phase against model depth, on random-weight Llama
models built from a config (no download), so what one more decoder block costs can be read off.

    python -m metricgp.experiments.scale --out results/scale                    # 8B block shape and a small one
    python -m metricgp.experiments.scale --shapes small --layers 1,2 --out /tmp/s   # a quick look

Every (phase, shape, depth) runs in a fresh Python process (`--worker`), which builds the model, runs
the phase once on random calibration windows, and reports its peak resident set (ru_maxrss) and the
phase's seconds; a "model" row (build only) is the baseline each phase adds to. This file only
imports the library's public functions, so `PYTHONPATH=<older checkout> python <this file> ...`
measures an older version with the same driver (the before/after figures in results/scale).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from metricgp.expr import compile_metric, resolve_metric
from metricgp.models import prunable_layers
from metricgp.plotting import pyplot, save_figure
from metricgp.prune.engine import DenseWeights, prune_oneshot, prune_sequential
from metricgp.prune.patterns import Unstructured
from metricgp.stats import compute_stats

try:
    from metricgp.measure import window_losses
except ImportError:  # a checkout from before measure.py (how results/scale/before was measured)
    from metricgp.evaluate import window_losses

# name -> (hidden, intermediate, heads, kv heads, vocabulary); 8B: Llama-3.1-8B's block (its 128K
# vocabulary would add a constant 4 GB of embeddings at fp32, so the vocabulary is 32K here)
SHAPES = {"8b": (4096, 14336, 32, 8, 32768), "small": (576, 1536, 9, 3, 32768)}
PHASES = ("model", "statistics", "search-evaluation", "sequential", "reconstruct")
WINDOWS, SEQLEN = 4, 128


def build(shape: str, layers: int):
    hidden, inter, heads, kv, vocab = SHAPES[shape]
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    calib = torch.randint(0, vocab, (WINDOWS, SEQLEN), generator=torch.Generator().manual_seed(0))
    return model, calib


def run_phase(phase: str, model, calib) -> None:
    """One phase of the pipeline, through the library's public functions."""
    layers = prunable_layers(model)
    wanda = compile_metric(resolve_metric("wanda"))
    if phase == "statistics":
        compute_stats(model, layers, calib, grads=True)
    elif phase == "search-evaluation":
        stats = compute_stats(model, layers, calib, grads=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        dense = DenseWeights(layers)
        prune_oneshot(dense, stats, wanda, Unstructured(0.5))
        window_losses(model, calib[:2], batch_size=2)
        dense.restore()
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss <= before:
            print("note: the statistics pass set this phase's peak", file=sys.stderr)
    elif phase in ("sequential", "reconstruct"):
        prune_sequential(model, calib, None, wanda, Unstructured(0.5), reconstruct=phase == "reconstruct")
    elif phase != "model":
        raise ValueError(f"unknown phase {phase}")


def worker(phase: str, shape: str, layers: int) -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, calib = build(shape, layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    t0 = time.perf_counter()
    run_phase(phase, model, calib)
    seconds = time.perf_counter() - t0
    hidden, inter, *_ = SHAPES[shape]
    return {"phase": phase, "layers": layers, "shape": shape, "hidden": hidden, "intermediate": inter,
            "model_bytes": model_bytes, "block_bytes": block_bytes,
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": round(seconds, 2)}


def measure(phase: str, shape: str, layers: int) -> dict:
    """`worker` in a fresh process: its peak is this phase's alone."""
    out = subprocess.run([sys.executable, __file__, "--worker", phase, shape, str(layers)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{phase} {shape} x{layers} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_block_costs(rows: list[dict]) -> list[dict]:
    """For each phase and shape: what one more block adds to the peak, against the block's own bytes."""
    out = []
    keyed = {(r["phase"], r["shape"], r["layers"]): r for r in rows}
    for (phase, shape, layers), row in sorted(keyed.items()):
        deeper = sorted(n for p, s, n in keyed if p == phase and s == shape and n > layers)
        if not deeper:
            continue
        nxt = keyed[(phase, shape, deeper[0])]
        per_block = (nxt["peak_bytes"] - row["peak_bytes"]) / (deeper[0] - layers)
        out.append({"phase": phase, "shape": shape, "from": layers, "to": deeper[0],
                    "peak_per_block_bytes": per_block, "block_bytes": row["block_bytes"],
                    "ratio": per_block / row["block_bytes"]})
    return out


def write_report(rows: list[dict], out: Path, command: str) -> None:
    costs = per_block_costs(rows)
    payload = {"command": command, "windows": WINDOWS, "seqlen": SEQLEN, "dtype": "float32", "device": "cpu",
               "rows": rows, "per_block": costs}
    (out / "memory.json").write_text(json.dumps(payload, indent=1) + "\n")
    gib = 2**30
    lines = ["# Peak resident memory per phase against depth (random-weight Llama, CPU, float32)", "",
             f"Made by `{command}`; {WINDOWS} calibration windows of {SEQLEN} tokens; each row is a fresh process.",
             "", "| phase | shape | layers | model GiB | peak GiB | seconds |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['phase']} | {r['shape']} | {r['layers']} | {r['model_bytes'] / gib:.2f} | "
              f"{r['peak_bytes'] / gib:.2f} | {r['seconds']:.1f} |" for r in rows]
    lines += ["", "What one more block adds to each phase's peak, in units of the block's own bytes (goal: <= 1.5).",
              "A peak RSS moves by tens of MB from run to run (allocator, threads), so the ratios of blocks",
              "smaller than that (the small shape's 14 MB) are noise; the 8B shape's 0.81 GiB blocks are not.", "",
              "| phase | shape | layers | GiB per block | block GiB | ratio |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {c['phase']} | {c['shape']} | {c['from']}->{c['to']} | {c['peak_per_block_bytes'] / gib:.2f} | "
              f"{c['block_bytes'] / gib:.2f} | {c['ratio']:.2f} |" for c in costs]
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "memory.png")


def plot(rows: list[dict], path: Path) -> None:
    """Peak GiB against depth, one line per phase, one panel per shape; the model's own bytes dashed."""
    plt = pyplot()
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        mine = [r for r in rows if r["shape"] == shape]
        for phase in sorted({r["phase"] for r in mine}):
            pts = sorted((r["layers"], r["peak_bytes"] / 2**30) for r in mine if r["phase"] == phase)
            ax.plot(*zip(*pts, strict=True), marker="o", label=phase)
        model = sorted({(r["layers"], r["model_bytes"] / 2**30) for r in mine})
        ax.plot(*zip(*model, strict=True), "k--", label="model bytes")
        ax.set(title=f"{shape} block shape", xlabel="decoder blocks", ylabel="peak resident GiB")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metricgp.experiments.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="small,8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--layers", default="1,2,4", help="comma-separated depths (default 1,2,4)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    p.add_argument("--out", type=Path, default=Path("results/scale"))
    p.add_argument("--worker", nargs=3, metavar=("PHASE", "SHAPE", "LAYERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return 0
    shapes, phases = args.shapes.split(","), args.phases.split(",")
    bad = [s for s in shapes if s not in SHAPES] + [f for f in phases if f not in PHASES]
    if bad:
        print(f"error: unknown shape or phase: {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        depths = sorted({int(n) for n in args.layers.split(",")})
    except ValueError:
        print(f"error: --layers must be comma-separated integers, got {args.layers!r}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.out / "rows.jsonl"  # resumable: finished rows are kept
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    have = {(r["phase"], r["shape"], r["layers"]) for r in rows}
    command = "python -m metricgp.experiments.scale " + " ".join(sys.argv[1:] if argv is None else argv)
    for shape in shapes:
        for layers in depths:
            for phase in phases:
                if (phase, shape, layers) in have:
                    continue
                row = measure(phase, shape, layers)
                print(f"{phase:18s} {shape:5s} x{layers}: peak {row['peak_bytes'] / 2**30:.2f} GiB, "
                      f"{row['seconds']:.1f} s", flush=True)
                rows.append(row)
                with done.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    write_report(rows, args.out, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
