"""`make gpu-check`: every phase of the pipeline on a random-weight Llama-3.1-8B-shaped model in bfloat16
on one GPU (no download), with each phase's seconds and peak device memory, in
results/scale/gpu-<device>.json: what `python -m metricgp.memory` predicts, measured.

    python -m metricgp.experiments.gpu_check                        # 32 blocks, 128K vocabulary, on cuda
    python -m metricgp.experiments.gpu_check --device cpu --tiny    # the smoke test (a tiny model, CPU)

The phases run one after the other in this process on one session (experiments/phases.py): the
statistics, five metric-search evaluations, apply oneshot and reconstruct, structured pruning to 70%
with --refit, one DarwinLM generation and two LoRA recovery steps. A phase's peak is the device's
(torch.cuda.max_memory_allocated, reset before it) or, on CPU, the process's resident set. A phase that
runs out of memory is recorded as such and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from metricgp.experiments.phases import DTYPES, PeakMeter, Session, measure_phase
from metricgp.provenance import provenance, write_json_atomic

GPU_PHASES = ("model", "statistics", "search-evaluation", "apply-oneshot", "reconstruct", "structured-refit",
              "darwin-generation", "recovery")
LLAMA_3_1_8B = {"layers": 32, "vocab": 128256}


def device_name(device: str) -> str:
    kind = torch.device(device).type
    name = torch.cuda.get_device_name(torch.device(device)) if kind == "cuda" else kind
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@contextmanager
def cache_dir(path: Path | None) -> Iterator[None]:
    """$METRICGP_CACHE at `path` (default: a temporary directory) while inside: a random model's
    statistics and Hessians (28 GB at 8B) have no place in the user's cache."""
    before = os.environ.get("METRICGP_CACHE")
    with tempfile.TemporaryDirectory(prefix="metricgp-gpu-check-") as temporary:
        os.environ["METRICGP_CACHE"] = str(path or temporary)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("METRICGP_CACHE", None)
            else:
                os.environ["METRICGP_CACHE"] = before


def run(device: str, shape: str, layers: int, vocab: int | None, dtype: str, windows: int, seqlen: int,
        phases: tuple[str, ...] = GPU_PHASES, offload: bool = False) -> list[dict]:
    meter = PeakMeter(device)
    session = Session(shape, layers, dtype, device, windows, seqlen, vocab, offload)
    rows = []
    for phase in phases:
        try:
            row = measure_phase(phase, session, meter)
        except torch.OutOfMemoryError as err:
            row = {"phase": phase, "error": f"out of memory: {str(err).splitlines()[0]}"}
        gc.collect()
        if meter.cuda:
            torch.cuda.empty_cache()
        rows.append(row)
        peak = f"{row['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in row else row["error"]
        print(f"{phase:18s} {peak}, {row.get('seconds', 0):.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metricgp.experiments.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, ... or cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of Llama-3.1-8B's shape (smoke test)")
    p.add_argument("--layers", type=int, default=None, help="decoder blocks (default 32; --tiny: 2)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    p.add_argument("--windows", type=int, default=4, help="calibration windows (default 4)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512; --tiny: 32)")
    p.add_argument("--out", type=Path, default=Path("results/scale"))
    p.add_argument("--offload", action="store_true", help="the decoder blocks in host memory, one at a time on the "
                   "device (the commands' --offload); written to gpu-<device>-offload.json")
    p.add_argument("--cache", type=Path, default=None, help="where the Hessians go (default: a temporary directory)")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (use --device cpu --tiny for the smoke test)",
              file=sys.stderr)
        return 2
    shape = "tiny" if args.tiny else "8b"
    layers = args.layers or (2 if args.tiny else LLAMA_3_1_8B["layers"])
    vocab = None if args.tiny else LLAMA_3_1_8B["vocab"]
    seqlen = 32 if args.tiny and args.seqlen == 512 else args.seqlen
    started = provenance()
    with cache_dir(args.cache):
        rows = run(args.device, shape, layers, vocab, args.dtype, args.windows, seqlen, offload=args.offload)
    name = device_name(args.device)
    path = args.out / f"gpu-{name}{'-offload' if args.offload else ''}.json"
    write_json_atomic(path, {"device": name, "shape": shape, "layers": layers, "vocab": vocab, "dtype": args.dtype,
                             "offload": args.offload,
                             "windows": args.windows, "seqlen": seqlen, "rows": rows, **started})
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
