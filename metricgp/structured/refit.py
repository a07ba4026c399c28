"""A least-squares refit of the kept weights after structured pruning (`apply --structured --refit`),
and the optional weight update of DarwinLM's levels (`darwin --update ls`; DarwinLM's database
stores updated weights, ZipLM's structured OBS does the same).

Removing heads or channels of a module removes input columns K' of its output projection (o_proj,
down_proj). With H = E[x x^T] of that projection's input on the dense model's calibration windows,
the kept columns K are re-fitted so the module's output moves as little as possible:

    W'_K = argmin E || W x - W'_K x_K ||^2 = W H_{:,K} (H_KK + lambda I)^{-1},   W'_K' = 0

(lambda: RIDGE x mean diag H_KK, as the unstructured reconstruction). Nothing per level is stored:
H of every output projection is computed once on the dense model's calibration windows, a decoder
block at a time (`metricgp.blocks.BlockInputs`: only one block's Hessians exist at once, on the
model's device), and cached on disk beside the statistics, one file per block. They are read back
one matrix at a time when a module's update is needed (one Cholesky solve when a plan or a genome
needs it), so memory holds one (in x in) matrix, not one per output projection of the model (a
14336-wide down_proj's is 0.8 GB in float32: at 32 blocks, more than an 8B model in bfloat16).
H is the dense model's, so blocks are refitted independently (not sequentially on the pruned
model's own inputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from metricgp.blocks import BlockInputs
from metricgp.data import parse_data_ref
from metricgp.errors import MetricGPError
from metricgp.fileio import atomic_path
from metricgp.models import cache_root, find_blocks
from metricgp.offload import resident
from metricgp.prune.reconstruct import hessian_hooks
from metricgp.stats import layers_by_block, stats_key
from metricgp.structured.groups import Module
from metricgp.structured.importance import Unit

RIDGE = 0.01
HESSIAN_DTYPE = torch.float32
HESSIANS_VERSION = 2  # 2: one file per decoder block


def removed_columns(module: Module, units: Sequence[Unit]) -> list[int]:
    """The output projection's input columns that `units` of `module` remove."""
    out = module.slices[-1]
    return sorted(i * out.size + r for u in units for i in u.members for r in range(out.size))


@torch.no_grad()
def refit_columns(weight: torch.Tensor, hessian: torch.Tensor, removed: Sequence[int],
                  ridge: float = RIDGE) -> torch.Tensor:
    """`weight` (out x in) with the `removed` columns zero and the others re-fitted (see the module doc)."""
    keep = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    keep[list(removed)] = False
    w = weight.detach().to(torch.float64)
    h = hessian.to(device=weight.device, dtype=torch.float64)
    a = h[keep][:, keep]
    a.diagonal().add_(ridge * a.diagonal().mean().clamp_min(1e-12))
    b = h[keep] @ w.T  # (|K|, out)
    chol, info = torch.linalg.cholesky_ex(a)
    solved = torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.lstsq(a, b).solution
    out = torch.zeros_like(w)
    out[:, keep] = solved.T
    if not torch.isfinite(out).all():  # a broken system: keep the plain mask
        out = w.clone()
        out[:, ~keep] = 0
    return out.to(weight.dtype)


def output_hessians(model: nn.Module, linears: dict[str, nn.Linear],
                    calib: torch.Tensor) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(block index, {name: H = X^T X / tokens}) for every decoder block holding some of the named
    linears, block by block on the dense model (float32, on the host); a block's Hessians are
    accumulated on the model's device while it runs and leave it before the next block does."""
    blocks = find_blocks(model)[1]
    per_block = layers_by_block(blocks, linears)
    wanted = [i for i, mine in enumerate(per_block) if mine]
    if not wanted:
        return
    inputs = BlockInputs.capture(model, calib)
    hidden = inputs.first_hidden
    with torch.no_grad():
        for i in tqdm(range(wanted[-1] + 1), desc="output-projection Hessians", unit="block", leave=False):
            sums: dict[str, torch.Tensor] = {}
            with resident(model, blocks[i]), (hessian_hooks(per_block[i], sums) if per_block[i]
                                              else contextlib.nullcontext()):
                hidden = [inputs.call(i, h) for h in hidden]
            if sums:
                yield i, {n: (h / calib.numel()).to("cpu", HESSIAN_DTYPE) for n, h in sums.items()}


class HessianStore(Mapping):
    """Output-projection Hessians cached on disk, one safetensors file per decoder block, read one
    matrix at a time (`store[name]`): memory never holds more than the matrix being used."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, Path] = {}
        for path in sorted(directory.glob("block-*.safetensors")) if directory.is_dir() else ():
            with safe_open(str(path), framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def add(self, block: int, hessians: dict[str, torch.Tensor]) -> None:
        path = self.directory / f"block-{block}.safetensors"
        with atomic_path(path) as tmp:
            save_file({n: t.contiguous() for n, t in hessians.items()}, str(tmp))
        self.files.update(dict.fromkeys(hessians, path))


def cached_output_hessians(setup, modules: list[Module]) -> HessianStore:
    """`output_hessians` of every module's output projection, from the disk cache or computed once
    (only the blocks whose file is missing)."""

    spec = setup.spec
    key = stats_key(setup.fingerprint, str(parse_data_ref(spec.calib, "calibration")), spec.n_calib,
                    spec.seqlen, spec.seed, False)
    store = HessianStore(cache_root() / "hessians" / f"{key}-out-v{HESSIANS_VERSION}")
    missing = [m.slices[-1].linear for m in modules if m.slices[-1].linear not in store]
    if missing:
        setup.dense.restore()
        for block, hessians in output_hessians(setup.model, {n: setup.layers[n] for n in missing}, setup.calib):
            store.add(block, hessians)
    return store


class OutputRefit:
    """The refitted output projection of a module for a set of removed units."""

    def __init__(self, setup, modules: list[Module]):
        self.hessians = cached_output_hessians(setup, modules)
        self.setup = setup  # its dense copy read when asked (not held: a setup shrunk in place drops it)

    def weight(self, module: Module, units: Sequence[Unit], dense: torch.Tensor | None = None) -> torch.Tensor:
        """`dense`: the output projection's dense weight (None: the setup's dense copy of it)."""
        name = module.slices[-1].linear
        if dense is None:
            dense = self.setup.dense.weights[name]
        return refit_columns(dense, self.hessians[name], removed_columns(module, units))


def hessian_bytes(modules: list[Module], linears: dict[str, nn.Linear]) -> int:
    """What the cache of `output_hessians` holds: one (in x in) float32 matrix per output projection."""
    return sum(linears[m.slices[-1].linear].in_features ** 2 for m in modules) * HESSIAN_DTYPE.itemsize


# --update name -> fn(pruner) -> the pruner's OutputRefit, or None (`StructuredPruner.output_refit`)
UPDATES: dict[str, Callable[..., OutputRefit | None]] = {"none": lambda pruner: None,
                                                         "ls": lambda pruner: pruner.output_refit()}


def check_update(name: str) -> str:
    if name not in UPDATES:
        raise MetricGPError(f"unknown weight update '{name}' (choose from {', '.join(UPDATES)})")
    return name
