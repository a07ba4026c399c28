"""A least-squares refit of the kept weights after structured pruning (`apply --structured --refit`),
and the optional weight update of DarwinLM's levels (`darwin --update ls`; DarwinLM's database
stores updated weights, ZipLM's structured OBS does the same).

Removing heads or channels of a module removes input columns K' of its output projection (o_proj,
down_proj). With H = E[x x^T] of that projection's input on the dense model's calibration windows,
the kept columns K are re-fitted so the module's output moves as little as possible:

    W'_K = argmin E || W x - W'_K x_K ||^2 = W H_{:,K} (H_KK + lambda I)^{-1},   W'_K' = 0

(lambda: RIDGE x mean diag H_KK, as the unstructured reconstruction). Nothing per level is stored:
H of every output projection is computed once (one forward pass over the calibration windows of
the dense model) and cached on disk beside the statistics, and a module's update is one Cholesky
solve when a plan or a genome needs it. H is the dense model's, so blocks are refitted
independently (not sequentially on the pruned model's own inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from metricgp.data import parse_data_ref
from metricgp.errors import MetricGPError
from metricgp.fileio import atomic_path
from metricgp.models import cache_root
from metricgp.prune.reconstruct import hessian_hooks
from metricgp.stats import stats_key
from metricgp.structured.groups import Module
from metricgp.structured.importance import Unit

RIDGE = 0.01
HESSIAN_DTYPE = torch.float32
HESSIANS_VERSION = 1


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


def output_hessians(model: nn.Module, linears: dict[str, nn.Linear], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = X^T X / tokens of each named linear's input, on the dense model (float32)."""

    sums: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    with torch.no_grad(), hessian_hooks(linears, sums):
        for window in tqdm(calib, desc="output-projection Hessians", unit="win", leave=False):
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    return {n: (h / calib.numel()).to("cpu", HESSIAN_DTYPE) for n, h in sums.items()}


def cached_output_hessians(setup, modules: list[Module]) -> dict[str, torch.Tensor]:
    """`output_hessians` of every module's output projection, from the disk cache or computed once."""

    spec = setup.spec
    key = stats_key(setup.fingerprint, str(parse_data_ref(spec.calib, "calibration")), spec.n_calib,
                    spec.seqlen, spec.seed, False)
    path = cache_root() / "hessians" / f"{key}-out-v{HESSIANS_VERSION}.safetensors"
    names = [m.slices[-1].linear for m in modules]
    if path.is_file():
        cached = load_file(str(path))
        if set(names) <= set(cached):
            return {n: cached[n] for n in names}
    setup.dense.restore()
    found = output_hessians(setup.model, {n: setup.layers[n] for n in names}, setup.calib)
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in found.items()}, str(tmp))
    return found


class OutputRefit:
    """The refitted output projection of a module for a set of removed units."""

    def __init__(self, setup, modules: list[Module]):
        self.hessians = cached_output_hessians(setup, modules)
        self.dense = setup.dense

    def weight(self, module: Module, units: Sequence[Unit]) -> torch.Tensor:
        name = module.slices[-1].linear
        return refit_columns(self.dense.weights[name], self.hessians[name], removed_columns(module, units))


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
