"""A whole random-weight model at a real model's block shape, pruned by the real commands on this machine,
with each command's peak resident memory: the proof that `python -m metricgp.apply` prunes a model
close to the host's memory (issue 19: all 32 of Llama-3.1-8B's blocks, about 15 GB in bfloat16, on a
24 GB machine, where a second copy of the weights would not fit).

    python -m metricgp.experiments.whole_model write --dir /data/llama8b-random          # once (~15 GB)
    python -m metricgp.experiments.whole_model run --dir /data/llama8b-random --out results/scale/whole-8b

`write` builds the checkpoint one tensor at a time (the model itself is never in memory: the parameter
names and shapes come from the model built on the `meta` device) and saves it in shards of one block,
with the default model's tokenizer (its vocabulary sizes the embeddings). `run` runs each command in a
fresh process under `/usr/bin/time -v` and writes what it reports (peak resident set, seconds, exit
status) and the command line to `<out>/whole.json` and a table to `<out>/whole.md`. The model is not
committed; the commands and their measurements are.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from metricgp.errors import MetricGPError, cli_entry
from metricgp.experiments.phases import SHAPES
from metricgp.models import find_blocks, resolve_model_path
from metricgp.provenance import write_json_atomic

GIB = 2**30
INIT_STD = 0.02  # transformers' initializer_range for Llama


def write_checkpoint(directory: Path, shape: str = "8b", layers: int = 32, tokenizer_from: str = "default",
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Write a random-weight Llama of `layers` blocks of `shape` to `directory`, one block per shard, without
    ever holding the model; returns its bytes. Norm weights are ones, every other tensor N(0, 0.02^2)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from))
    config = SHAPES[shape].config(layers, vocab=len(tokenizer))
    config.dtype = dtype
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    prefix, _ = find_blocks(skeleton)
    shards: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, p in skeleton.named_parameters():
        block = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
        shards.setdefault(f"block-{int(block.group(1)):03d}" if block else "outer", []).append((name, p.shape))
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for shard, params in sorted(shards.items()):
        tensors = {}
        for name, size in params:
            t = (torch.ones(size) if name.endswith("norm.weight") else
                 torch.empty(size).normal_(0.0, INIT_STD, generator=generator)).to(dtype)
            tensors[name] = t
            total += t.numel() * t.element_size()
        file = f"model-{shard}.safetensors"
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return total


def commands(model_dir: Path, work: Path, windows: int, seqlen: int) -> dict[str, list[str]]:
    """The commands measured: apply with wanda (unstructured 50%) and structured 70% kept with the refit,
    in bfloat16 on the CPU, a few short calibration and evaluation windows."""
    shared = ["--model", str(model_dir), "--dtype", "bf16", "--device", "cpu", "--calib", "wikitext2",
              "--n-calib", str(windows), "--seqlen", str(seqlen), "--dataset", "wikitext2",
              "--eval-windows", str(windows), "--overwrite"]
    return {
        "apply wanda 50%": ["-m", "metricgp.apply", "--metric", "wanda", "--sparsity", "0.5", *shared,
                            "--out", str(work / "wanda")],
        "apply --structured wanda 70% --refit": ["-m", "metricgp.apply", "--structured", "--metric", "wanda",
                                                 "--keep", "0.7", "--refit", *shared,
                                                 "--out", str(work / "structured")],
    }


def _time_v(output: str) -> dict:
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", output)
    seconds = None
    if wall:
        parts = [float(x) for x in wall.group(1).split(":")]
        seconds = sum(x * 60 ** i for i, x in enumerate(reversed(parts)))
    return {"peak_bytes": int(peak.group(1)) * 1024 if peak else None, "seconds": seconds}


def run(model_dir: Path, out: Path, only: list[str] | None, windows: int, seqlen: int, keep_outputs: bool) -> dict:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    path = out / "whole.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    result.update(model={k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "vocab_size")}
                  | {"bytes": index["metadata"]["total_size"], "dtype": "bfloat16"},
                  machine={"memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                           "cpus": os.cpu_count()})
    with tempfile.TemporaryDirectory(prefix="metricgp-whole-", dir=out if keep_outputs else None) as work:
        for label, argv in commands(model_dir, Path(work), windows, seqlen).items():
            if only and label not in only:
                continue
            print(f"{label}: {shlex.join(['python', *argv])}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, *argv], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONSAFEPATH": "1"})
            measured = _time_v(proc.stderr)
            report_path = Path(argv[argv.index("--out") + 1]) / "report.json"
            report = json.loads(report_path.read_text()) if report_path.is_file() else {}
            row = {"command": "python " + shlex.join(argv), "exit_status": proc.returncode, **measured,
                   "seconds_driver": round(time.perf_counter() - t0, 1),
                   "perplexity": report.get("perplexity"),
                   "sparsity": (report.get("sparsity") or {}).get("overall"),
                   "achieved_keep": report.get("achieved_keep") or (report.get("size") or {}).get("achieved_keep"),
                   "error_tail": proc.stderr.strip().splitlines()[-30:] if proc.returncode else None}
            result["rows"][label] = row
            if not keep_outputs:  # a pruned 8B model is 10-14 GB of disk: gone once its report is read
                shutil.rmtree(report_path.parent, ignore_errors=True)
            print(f"  exit {proc.returncode}, peak {(measured['peak_bytes'] or 0) / GIB:.2f} GiB, "
                  f"{measured['seconds']} s", flush=True)
            write_json_atomic(path, result)
            write_table(out, result)
    return result


def write_table(out: Path, result: dict) -> None:
    m = result["model"]
    lines = ["# A whole 8B-shaped model pruned on this machine", "",
             f"Random-weight Llama: {m['num_hidden_layers']} blocks of hidden {m['hidden_size']}, intermediate "
             f"{m['intermediate_size']}, {m['num_attention_heads']}/{m['num_key_value_heads']} heads, vocabulary "
             f"{m['vocab_size']}; {m['bytes'] / GIB:.2f} GiB of bfloat16 weights. Machine: "
             f"{result['machine']['memory_bytes'] / GIB:.1f} GiB memory, {result['machine']['cpus']} CPUs. "
             "Peak resident set of the whole command (`/usr/bin/time -v`), loading, statistics, pruning, "
             "evaluation and saving included. Perplexities are of random weights: they show the command ran, "
             "not quality.", "",
             "| command | exit | peak GiB | peak / model | seconds |", "|---|---:|---:|---:|---:|"]
    for label, r in result["rows"].items():
        peak = r.get("peak_bytes") or 0
        lines.append(f"| {label} | {r['exit_status']} | {peak / GIB:.2f} | {peak / m['bytes']:.2f} | "
                     f"{r.get('seconds') or 0:.0f} |")
    lines += ["", "Commands (run by `python -m metricgp.experiments.whole_model run`):", ""]
    lines += [f"- {label}: `{r['command']}`" for label, r in result["rows"].items()]
    (out / "whole.md").write_text("\n".join(lines) + "\n")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metricgp.experiments.whole_model", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("write", help="write the random-weight checkpoint (once)")
    w.add_argument("--dir", type=Path, required=True)
    w.add_argument("--shape", default="8b", choices=tuple(SHAPES))
    w.add_argument("--layers", type=int, default=32)
    r = sub.add_parser("run", help="run the commands on it and record their peaks")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--out", type=Path, default=Path("results/scale/whole-8b"))
    r.add_argument("--only", default=None, help="comma-separated command labels (default: all)")
    r.add_argument("--windows", type=int, default=2, help="calibration and evaluation windows (default 2)")
    r.add_argument("--seqlen", type=int, default=128, help="tokens per window (default 128)")
    r.add_argument("--keep-outputs", action="store_true", help="keep the pruned models under --out")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.what == "write":
        if (args.dir / "config.json").exists():
            raise MetricGPError(f"{args.dir} already holds a model")
        total = write_checkpoint(args.dir, args.shape, args.layers)
        print(f"wrote {total / GIB:.2f} GiB to {args.dir}")
        return 0
    if not (args.dir / "model.safetensors.index.json").is_file():
        raise MetricGPError(f"{args.dir} holds no checkpoint written by `write`")
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.dir, args.out, args.only.split(",") if args.only else None, args.windows, args.seqlen,
        args.keep_outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
