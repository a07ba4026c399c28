"""Reconstruction after the mask: a least-squares update of the kept weights.

Any metric picks the mask; this step then changes the surviving weights of each output row so
the layer's output on calibration inputs moves as little as possible with the mask fixed:

    min_{W'}  || (W - W') X^T ||^2   subject to  W'_ij = 0 where the mask prunes,

i.e. for each row r with kept set S:  H_SS w'_S = (H w_r)_S  with H = X^T X (+ a small ridge).
All rows are solved at once by conjugate gradients on the masked system; each iteration is one
(out x in) @ (in x in) matmul. On a test problem this reached the exact per-row solution in ~10
iterations, where SparseGPT's left-to-right OBS sweep with the same fixed mask recovered only a
third of the possible error reduction.
"""

from __future__ import annotations

import torch
from torch import nn

from metricgp.stats import layer_input_hooks

RIDGE = 0.01  # fraction of mean(diag H) added to the diagonal (SparseGPT's dampening)
CG_ITERS = 30
CG_TOL = 1e-10  # relative squared residual at which a row counts as solved


def hessian_hooks(layers: dict[str, nn.Linear], hessians: dict[str, torch.Tensor]):
    """Accumulate H = sum x x^T (float32) of each layer's input while active, on the device the inputs
    arrive on (an offloaded model's weights are on the host while its activations are not)."""

    def add(name: str, x: torch.Tensor) -> None:
        if name not in hessians:
            hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        hessians[name].addmm_(x.T, x)

    return layer_input_hooks(layers, add)


@torch.no_grad()
def least_squares_update(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor,
                         ridge: float = RIDGE, iters: int = CG_ITERS) -> torch.Tensor:
    """The masked weight with its kept entries re-fitted; exactly zero where `keep` is False."""
    w = weight.detach().float()
    mask = keep.to(w.dtype)
    h = hessian.float().clone()
    h.diagonal().add_(ridge * h.diagonal().mean().clamp_min(1e-12))
    x = w * mask
    r = (w - x) @ h * mask  # = b - A x with b = (w H)_S and A x = (x H)_S
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    stop = CG_TOL * rs.max().clamp_min(1e-30)
    for _ in range(iters):
        if rs.max() <= stop:
            break
        ap = (p @ h) * mask
        alpha = rs / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)
        x += alpha * p
        r -= alpha * ap
        rs_new = (r * r).sum(1, keepdim=True)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    if not torch.isfinite(x).all():  # numerically broken system: keep the plain mask
        x = w * mask
    return (x * mask).to(weight.dtype)
