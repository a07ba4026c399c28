"""`python -m metricgp.memory --config NAME_OR_JSON --gpu-gib 80 [--offload]`: the peak device and host
memory of every phase of the pipeline for a model config, and whether it fits.

The figures are measured, not modelled by hand: `make bench-scale` measures each phase's peak on
random-weight Llama models of a real model's block shape at 1, 2 and 4 blocks (and at a second
vocabulary), in bfloat16 weights, and ships the rows in metricgp/configs/memory_rows.json. For each
phase this fits

    device peak = a + b x blocks + c x (embedding and head bytes)        host = base + h x blocks

by least squares (device = the measured peak less the interpreter and the statistics the library
keeps on the host beside a GPU) and evaluates it at the config's depth and vocabulary. c (how many
copies of the embedding/head bytes a phase holds) comes from rows that differ only in vocabulary and
is shared by every shape. A config whose block shape was not measured (hidden, intermediate, heads,
KV heads) takes the nearest measured shape's a (less the embeddings) and b scaled by the ratio of
block bytes, and says so. Activations were measured at the benchmark's 2 calibration windows of 128
tokens; longer windows add activations (hidden states of every window, logits chunks) not counted here.

`--offload` answers for the commands' `--offload` (metricgp/offload.py: the decoder blocks in host
memory, one at a time on the device) from rows measured that way (`make bench-scale` with
`--offload`): on the CPU the "device" and the host are one memory, so the device's share is the peak
less the blocks' host bytes. Offloaded recovery is LoRA on a structured model: adapters on the
device, each block brought back for its gradient-checkpointed recomputation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from metricgp.errors import MetricGPError, cli_entry
from metricgp.models import find_blocks

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PACKAGED_ROWS = CONFIG_DIR / "memory_rows.json"
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")
GIB = 2**30
DTYPE = "bfloat16"  # the weights' dtype on a GPU, which the shipped rows were measured in


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p != PACKAGED_ROWS)


def load_config(name_or_path: str) -> dict:
    """A shipped config by name, or any JSON file with the fields of a Hugging Face config.json."""
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    path = shipped if shipped.is_file() else Path(name_or_path)
    if not path.is_file() or path == PACKAGED_ROWS:
        raise MetricGPError(f"unknown config '{name_or_path}': a JSON file, or one of {', '.join(config_names())}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetricGPError(f"{path} is not JSON: {err}") from err
    missing = [f for f in CONFIG_FIELDS if not isinstance(config.get(f), int)]
    if missing:
        raise MetricGPError(f"{path} lacks integer {', '.join(missing)}")
    return config


def weight_bytes(config: dict, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(one decoder block's bytes, the bytes outside the blocks: embeddings, head, final norm), counted on
    the config's model built on the meta device (no memory, no download)."""
    kind = config.get("model_type", "llama")
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    hf_config = transformers.AutoConfig.for_model(kind, **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    size = dtype.itemsize
    blocks = find_blocks(model)[1]
    block = sum(p.numel() for p in blocks[0].parameters()) * size
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * size
    return block, total - block * len(blocks)


# ------------------------------------------------------------------ fitting the measured rows

def _shape(row: dict) -> tuple[int, int, int, int]:
    return row["hidden"], row["intermediate"], row["heads"], row["kv_heads"]


def device_bytes(row: dict) -> int:
    """What a GPU would hold at the phase's peak: the measured peak less the interpreter, the host-side
    statistics resident during the phase and, offloaded, the decoder blocks kept on the host."""
    return row["peak_bytes"] - row["base_bytes"] - row["held_bytes"] - row.get("offloaded_bytes", 0)


def row_phase(row: dict) -> str:
    """A row's phase, marked when it ran offloaded."""
    return row["phase"] + (" (offload)" if row.get("offload") else "")


def outside_bytes(row: dict) -> int:
    """The embedding/head bytes of a row's model."""
    return row["model_bytes"] - row["layers"] * row["block_bytes"]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x; one x gives b = 0."""
    xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
    ys = torch.tensor([p[1] for p in points], dtype=torch.float64)
    if len(set(xs.tolist())) < 2:
        return float(ys.mean()), 0.0
    design = torch.stack([torch.ones_like(xs), xs], dim=1)
    a, b = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution.squeeze(1).tolist()
    return a, b


def embedding_copies(rows: list[dict]) -> float | None:
    """c of one phase: the device bytes added per byte of embeddings/head, from rows that differ only in
    vocabulary (None where no such pair was measured)."""
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[(_shape(r), r["layers"])].append(r)
    slopes = [fit_line([(outside_bytes(r), device_bytes(r)) for r in same])[1]
              for same in by_setting.values() if len({r["vocab"] for r in same}) > 1]
    return sum(slopes) / len(slopes) if slopes else None


@dataclass(frozen=True)
class PhaseFit:
    """A phase's device and host peak at any depth and embedding size, fitted on one block shape."""

    phase: str
    shape: tuple[int, int, int, int]
    block_bytes: int
    a: float  # device bytes at 0 blocks, without the embeddings
    b: float  # device bytes per block
    c: float  # device bytes per embedding/head byte
    base: float  # the interpreter and libraries (host)
    host_a: float
    host_b: float  # host bytes (statistics) per block
    depths: tuple[int, ...]
    measured_c: bool

    def scaled(self, block_bytes: int) -> PhaseFit:
        """The same phase for another block shape: per-block terms in units of the block's bytes."""
        k = block_bytes / self.block_bytes
        return PhaseFit(self.phase, self.shape, block_bytes, self.a * k, self.b * k, self.c, self.base,
                        self.host_a * k, self.host_b * k, self.depths, self.measured_c)

    def device(self, blocks: int, outside: int) -> float:
        return self.a + self.b * blocks + self.c * outside

    def host(self, blocks: int) -> float:
        return self.base + self.host_a + self.host_b * blocks


def fit_phase(rows: list[dict], c: float | None) -> PhaseFit:
    """Fit one phase on one block shape's rows (at the shape's own vocabulary)."""
    vocab = min(r["vocab"] for r in rows)
    main = [r for r in rows if r["vocab"] == vocab]
    copies = 1.0 if c is None else c
    a, b = fit_line([(r["layers"], device_bytes(r) - copies * outside_bytes(r)) for r in main])
    host_a, host_b = fit_line([(r["layers"], r["host_bytes"]) for r in main])
    return PhaseFit(rows[0]["phase"], _shape(rows[0]), rows[0]["block_bytes"], a, b, copies,
                    sum(r["base_bytes"] for r in main) / len(main), host_a, host_b,
                    tuple(sorted({r["layers"] for r in main})), c is not None)


def phase_fits(rows: list[dict], dtype: str = DTYPE, offload: bool = False) -> dict[str, dict[tuple, PhaseFit]]:
    """{phase: {block shape: fit}} over the rows of `dtype` (run offloaded or not) with at least two depths."""
    mine = [r for r in rows if r["dtype"] == dtype and bool(r.get("offload")) == offload]
    by_phase: dict[str, list[dict]] = defaultdict(list)
    for r in mine:
        by_phase[r["phase"]].append(r)
    fits: dict[str, dict[tuple, PhaseFit]] = {}
    for phase, phase_rows in by_phase.items():
        c = embedding_copies(phase_rows)
        by_shape = defaultdict(list)
        for r in phase_rows:
            by_shape[_shape(r)].append(r)
        fits[phase] = {shape: fit_phase(rs, c) for shape, rs in by_shape.items()
                       if len({r["layers"] for r in rs}) >= 2}
    return {p: f for p, f in fits.items() if f}


def fit_check(rows: list[dict]) -> list[dict]:
    """For every phase and shape measured at three or more depths: the fit on the two shallowest (total
    peak = a + b x blocks) against the deepest measured peak, which the fit did not use."""
    groups = defaultdict(list)
    for r in rows:
        groups[(row_phase(r), r["shape"], r["dtype"], r["vocab"], r["windows"], r["seqlen"])].append(r)
    out = []
    for (phase, shape, *_), rs in sorted(groups.items()):
        by_depth = {r["layers"]: r for r in rs}
        depths = sorted(by_depth)
        if len(depths) < 3:
            continue
        a, b = fit_line([(n, by_depth[n]["peak_bytes"]) for n in depths[:2]])
        last = by_depth[depths[-1]]
        predicted = a + b * depths[-1]
        out.append({"phase": phase, "shape": shape, "fitted_on": depths[:2], "predicted_layers": depths[-1],
                    "predicted_bytes": predicted, "measured_bytes": last["peak_bytes"],
                    "error": predicted / last["peak_bytes"] - 1})
    return out


# ------------------------------------------------------------------ the estimate for a config

@dataclass(frozen=True)
class Estimate:
    phase: str
    device: float
    host: float
    method: str


def estimate(config: dict, rows: list[dict], offload: bool = False) -> list[Estimate]:
    block, outside = weight_bytes(config)
    layers = config["num_hidden_layers"]
    shape = (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
             config["num_key_value_heads"])
    out = []
    offloaded = phase_fits(rows, offload=True) if offload else {}
    for phase, by_shape in phase_fits(rows).items():
        note = ""
        if offload and phase in offloaded:
            by_shape = offloaded[phase]
        elif offload:
            note = "; not offloaded: every block on the device"
        if shape in by_shape:
            fit = by_shape[shape]
            method = f"fit on this block shape at {'/'.join(map(str, fit.depths))} blocks"
        else:
            near = min(by_shape.values(), key=lambda f: abs(f.block_bytes / block - 1))
            fit = near.scaled(block)
            method = (f"block shape not measured: the {near.shape[0]}x{near.shape[1]} shape's fit "
                      f"scaled by block bytes (x{block / near.block_bytes:.2f})")
        if not fit.measured_c:
            method += "; embeddings counted once (no second vocabulary measured)"
        out.append(Estimate(phase, fit.device(layers, outside), fit.host(layers), method + note))
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise MetricGPError(f"no measured rows at {path}: run `make bench-scale` (or pass --rows)")
    return json.loads(path.read_text())["rows"]


def report(name: str, config: dict, estimates: list[Estimate], gpu_gib: float, host_gib: float | None,
           offload: bool) -> str:
    block, outside = weight_bytes(config)
    weights = (block * config["num_hidden_layers"] + outside) / GIB
    lines = [f"{name}: {config['num_hidden_layers']} blocks of hidden {config['hidden_size']}, intermediate "
             f"{config['intermediate_size']}, {config['num_attention_heads']}/{config['num_key_value_heads']} heads, "
             f"vocabulary {config['vocab_size']}; bfloat16 weights {weights:.1f}"
             f" GiB; GPU {gpu_gib:g} GiB" + (f", host {host_gib:g} GiB" if host_gib else ""),
             "method: each phase's peak measured on random-weight models of a block shape at 1, 2 (and 4) blocks "
             "(make bench-scale), fitted as a + b x blocks + c x embedding bytes and evaluated here ('how' says "
             "on which rows); activations at 2 windows of 128 tokens",
             ("offload: the decoder blocks on the host, one at a time on the device (--offload); fitted on rows "
              "measured offloaded (device = peak less the blocks' host bytes)" if offload
              else "offload: off (every block on the device)"), "",
             f"{'phase':20s} {'device GiB':>10s} {'host GiB':>9s}  fits  how"]
    for e in estimates:
        fits = e.device <= gpu_gib * GIB and (host_gib is None or e.host <= host_gib * GIB)
        lines.append(f"{e.phase:20s} {e.device / GIB:10.1f} {e.host / GIB:9.1f}  {'yes' if fits else 'NO ':4s}  "
                     f"{e.method}")
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[dict], gpu_gib: float) -> str:
    """One column per config (`name` or `name:offload`): device / host GiB of every phase, ✗ where the device
    would not hold it (the README's table)."""
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    for column in columns:
        name, _, mode = column.partition(":")
        for e in estimate(load_config(name), rows, mode == "offload"):
            over = " ✗" if e.device > gpu_gib * GIB else ""
            cells[e.phase][column] = f"{e.device / GIB:.1f} / {e.host / GIB:.1f}{over}"
    header = ["phase", *(c.replace(":offload", " with `--offload`") for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join([phase, *(cells[phase].get(c, "") for c in columns)]) + " |" for phase in cells]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metricgp.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=f"one of {', '.join(config_names())}, or a config.json")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU's memory in GiB (default 80)")
    p.add_argument("--host-gib", type=float, default=None, help="the host's memory in GiB (default: not judged)")
    p.add_argument("--offload", action="store_true", help="the decoder blocks on the host, one at a time on the "
                   "device (the commands' --offload)")
    p.add_argument("--rows", type=Path, default=PACKAGED_ROWS, help="measured rows (default: the shipped ones)")
    p.add_argument("--table", default=None, metavar="CONFIGS", help="instead: a markdown table, device / host GiB "
                   "per phase, one column per comma-separated config (NAME or NAME:offload)")
    args = p.parse_args(argv)
    if args.table:
        columns = [c.strip() for c in args.table.split(",") if c.strip()]
        print(markdown_table(columns, read_rows(args.rows), args.gpu_gib))  # (built whole: an error prints nothing)
        return 0
    if not args.config:
        raise MetricGPError("give --config (or --table)")
    if args.gpu_gib <= 0 or (args.host_gib is not None and args.host_gib <= 0):
        raise MetricGPError("--gpu-gib and --host-gib must be positive")
    config = load_config(args.config)
    estimates = estimate(config, read_rows(args.rows), args.offload)
    if not estimates:
        raise MetricGPError(f"{args.rows} holds no {DTYPE} phase measured at two depths or more")
    print(report(args.config, config, estimates, args.gpu_gib, args.host_gib, args.offload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
