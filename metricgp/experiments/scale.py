"""`make bench-scale`: the peak memory of every phase of the pipeline against model depth, on
random-weight Llama models of a real model's block shape (experiments/phases.py; no download), so
what one more decoder block costs can be read off, and `python -m metricgp.memory` can fit it.

    python -m metricgp.experiments.scale --out results/scale                     # small, 8B and 14B shapes
    python -m metricgp.experiments.scale --shapes mini --layers 1,2 --out /tmp/s   # a quick look

Every (phase, shape, depth) runs in a fresh Python process (`--worker`): it builds the model, prepares
what the phase needs (the session: statistics from a cache shared by this run's processes, the dense
copy; a pruned copy for recovery), resets the peak resident set (/proc/self/clear_refs), runs the
phase, and reports the peak, the phase's seconds, and the bytes it holds where the library keeps them
on the host even beside a GPU (the statistics), so the device's share is peak - base - host. The rows
go to results/ and, for `python -m metricgp.memory`, to metricgp/configs/memory_rows.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from metricgp.cli.memory import PACKAGED_ROWS, device_bytes, fit_check, row_phase
from metricgp.experiments.phases import DTYPES, PHASES, SHAPES, PeakMeter, Session, measure_phase
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import write_json_atomic

DEFAULT_SHAPES = "small,8b,14b"
ROW_FIELDS = ("phase", "shape", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "dtype",
              "windows", "seqlen", "model_bytes", "block_bytes", "base_bytes", "held_bytes", "host_bytes", "peak_bytes",
              "seconds", "offload", "offloaded_bytes")
# glibc's allocator otherwise keeps freed blocks of up to 32 MB in its heap (a dynamic mmap threshold): the
# resident set would then follow the allocation history, not the bytes in use
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def worker(phases: list[str], shape: str, layers: int, dtype: str, windows: int, seqlen: int,
           vocab: int | None, offload: bool = False) -> list[dict]:
    """One row per phase, in this process, one after the other on one model (what a phase made is freed
    before the next is prepared; the bench gives each phase a process of its own)."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meter = PeakMeter("cpu")
    base = meter.resident()  # the interpreter and libraries, before any tensor of the model
    session = Session(shape, layers, dtype, "cpu", windows, seqlen, vocab, offload)
    s = SHAPES[shape]
    rows = []
    for phase in phases:
        row = measure_phase(phase, session, meter)
        row.update(shape=shape, layers=layers, hidden=s.hidden, intermediate=s.intermediate, heads=s.heads,
                   kv_heads=s.kv_heads, vocab=session.model.config.vocab_size, dtype=dtype, windows=windows,
                   seqlen=seqlen, base_bytes=base)
        rows.append({k: row[k] for k in ROW_FIELDS})
    return rows


def measure(phases: str | list[str], shape: str, layers: int, dtype: str = "bfloat16", windows: int = 2,
            seqlen: int = 128, vocab: int | None = None, cache: Path | None = None,
            offload: bool = False) -> list[dict]:
    """`worker` in a fresh process (one phase: its peak is this phase's alone). `cache`: the statistics
    cache the processes of one run share ($METRICGP_CACHE)."""
    names = [phases] if isinstance(phases, str) else list(phases)
    env = {**ALLOCATOR_ENV, **os.environ, **({"METRICGP_CACHE": str(cache)} if cache else {})}
    out = subprocess.run([sys.executable, "-m", "metricgp.experiments.scale", "--worker", ",".join(names), shape,
                          str(layers), "--dtype", dtype, "--windows", str(windows), "--seqlen", str(seqlen),
                          *(["--vocab", str(vocab)] if vocab else []), *(["--offload"] if offload else [])],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{','.join(names)} {shape} x{layers} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_block_costs(rows: list[dict]) -> list[dict]:
    """For each phase, shape and vocabulary: what one more block adds to the peak (and to its device
    share), in units of the block's own bytes."""
    out = []
    keyed = {(row_phase(r), r["shape"], r.get("vocab", 0), r["layers"]): r for r in rows}
    for (phase, shape, vocab, layers), row in sorted(keyed.items()):
        deeper = sorted(n for p, s, v, n in keyed if (p, s, v) == (phase, shape, vocab) and n > layers)
        if not deeper:
            continue
        nxt = keyed[(phase, shape, vocab, deeper[0])]
        steps = deeper[0] - layers
        total = (nxt["peak_bytes"] - row["peak_bytes"]) / steps
        device = (device_bytes(nxt) - device_bytes(row)) / steps
        out.append({"phase": phase, "shape": shape, "vocab": vocab, "from": layers, "to": deeper[0],
                    "peak_per_block_bytes": total, "device_per_block_bytes": device, "block_bytes": row["block_bytes"],
                    "ratio": total / row["block_bytes"], "device_ratio": device / row["block_bytes"]})
    return out


def write_report(rows: list[dict], out: Path, commands: list[str], package_rows: Path | None) -> None:
    costs = per_block_costs(rows)
    checks = fit_check(rows)
    settings = sorted({(r["dtype"], r["windows"], r["seqlen"]) for r in rows})
    write_json_atomic(out / "memory.json", {"commands": commands, "device": "cpu", "rows": rows, "per_block": costs,
                                            "fit_check": checks})
    if package_rows is not None:
        write_json_atomic(package_rows, {
            "made_by": commands, "how": "peak resident set of one phase per fresh process on CPU, random-weight "
            "Llama blocks (metricgp/experiments/scale.py)", "rows": rows})
    gib = 2**30
    lines = ["# Peak memory per phase against depth (random-weight Llama blocks, CPU)", "",
             "Made by " + "; ".join(f"`{c}`" for c in commands) + ".", "",
             "Settings (dtype, calibration windows, tokens): " + ", ".join(map(str, settings)) + ". Each row is a "
             "fresh process: the phase's session is prepared (statistics, dense weights read back from a saved "
             "checkpoint; a pruned copy for recovery), "
             "the peak resident set is reset, the phase runs. *device* = peak - interpreter (base) - the statistics "
             "the library keeps on the host beside a GPU, resident during the phase (the statistics phase hands "
             "each block's to the host, here to disk, as they are made): what a GPU would hold. *host* = the "
             "statistics the host holds afterwards.", "",
             "| phase | shape | vocabulary | layers | model GiB | peak GiB | device GiB | host GiB | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {row_phase(r)} | {r['shape']} | {r['vocab']} | {r['layers']} | {r['model_bytes'] / gib:.2f} | "
              f"{r['peak_bytes'] / gib:.2f} | {device_bytes(r) / gib:.2f} | {r['host_bytes'] / gib:.2f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    lines += ["", "What one more block adds to each phase's peak and to its device share, in units of the block's own",
              "bytes (goal: <= 1.5).", "",
              "| phase | shape | vocabulary | layers | GiB per block | block GiB | ratio | device ratio |",
              "|---|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {c['phase']} | {c['shape']} | {c['vocab']} | {c['from']}->{c['to']} | "
              f"{c['peak_per_block_bytes'] / gib:.2f} | {c['block_bytes'] / gib:.2f} | {c['ratio']:.2f} | "
              f"{c['device_ratio']:.2f} |" for c in costs]
    lines += ["", "The memory model's check (`python -m metricgp.memory`'s fit, peak = a + b x blocks): fitted on the "
              "two shallowest depths, predicting the deepest, which the fit did not use (goal: within 20%).", "",
              "| phase | shape | fitted on | predicted | predicted GiB | measured GiB | error |",
              "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {c['phase']} | {c['shape']} | {','.join(map(str, c['fitted_on']))} | {c['predicted_layers']} | "
              f"{c['predicted_bytes'] / gib:.2f} | {c['measured_bytes'] / gib:.2f} | {100 * c['error']:+.1f}% |"
              for c in checks]
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "memory.png")


def plot(rows: list[dict], path: Path) -> None:
    """Peak GiB against depth, one line per phase, one panel per shape; the model's own bytes dashed."""
    plt = pyplot()
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        vocab = min(r["vocab"] for r in rows if r["shape"] == shape)  # a second vocabulary is not a depth
        mine = [r for r in rows if r["shape"] == shape and r["vocab"] == vocab]
        for phase in [p for p in PHASES if any(r["phase"] == p for r in mine)]:
            pts = sorted((r["layers"], r["peak_bytes"] / 2**30) for r in mine if r["phase"] == phase)
            ax.plot(*zip(*pts, strict=True), marker="o", label=phase)
        model = sorted({(r["layers"], r["model_bytes"] / 2**30) for r in mine})
        ax.plot(*zip(*model, strict=True), "k--", label="model bytes")
        ax.set(title=f"{shape} block shape", xlabel="decoder blocks", ylabel="peak resident GiB")
        ax.legend(fontsize=6)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metricgp.experiments.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--layers", default="1,2,4", help="comma-separated depths (default 1,2,4)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="the weights' dtype (default bfloat16, "
                   "as on a GPU)")
    p.add_argument("--windows", type=int, default=2, help="calibration windows (default 2)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the shape's; a second one measures "
                   "how a phase's peak grows with the embedding bytes)")
    p.add_argument("--out", type=Path, default=Path("results/scale"))
    p.add_argument("--package-rows", type=Path, default=None,
                   help=f"also write the rows for `python -m metricgp.memory` here (make bench-scale: {PACKAGED_ROWS})")
    p.add_argument("--cache", type=Path, default=None, help="statistics cache shared by the rows (default: a "
                   "temporary directory; a fixed one lets a resumed run reuse what an earlier one computed)")
    p.add_argument("--offload", action="store_true", help="every phase with the decoder blocks on the host, one block "
                   "at a time on the device (here both are the CPU: device = peak - the blocks' host bytes)")
    p.add_argument("--worker", nargs=3, metavar=("PHASES", "SHAPE", "LAYERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0].split(","), args.worker[1], int(args.worker[2]), args.dtype,
                                args.windows, args.seqlen, args.vocab, args.offload)))
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
    have = {(r["phase"], r["shape"], r["layers"], r["dtype"], r["windows"], r["seqlen"], r["vocab"],
             r.get("offload", False)) for r in rows}
    command = "python -m metricgp.experiments.scale " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="metricgp-scale-") as temporary:  # statistics, shared by the rows
        cache = args.cache or Path(temporary)
        for shape in shapes:
            for layers in depths:
                for phase in [p for p in PHASES if p in phases]:
                    vocab = args.vocab or SHAPES[shape].vocab
                    if (phase, shape, layers, args.dtype, args.windows, args.seqlen, vocab, args.offload) in have:
                        continue
                    [row] = measure(phase, shape, layers, args.dtype, args.windows, args.seqlen, vocab, Path(cache),
                                    args.offload)
                    print(f"{row_phase(row):18s} {shape:5s} x{layers} v{vocab}: "
                          f"peak {row['peak_bytes'] / 2**30:.2f} GiB, "
                          f"device {device_bytes(row) / 2**30:.2f} GiB, {row['seconds']:.1f} s", flush=True)
                    row["command"] = command
                    rows.append(row)
                    with done.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
    commands = list(dict.fromkeys(r.get("command", "") for r in rows if r.get("command")))
    write_report(rows, args.out, commands, args.package_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
