"""The least-squares refit after a mask: exact zeros, no change without pruning, optimal error."""

from __future__ import annotations

import torch

from metricgp.prune.patterns import NM, Unstructured
from metricgp.prune.reconstruct import hessian_hooks, least_squares_update


def _problem(seed: int = 0, out: int = 24, inp: int = 64, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g) * 0.3  # correlated inputs
    w = torch.randn(out, inp, generator=g)
    return w, x, x.T @ x


def test_no_pruning_means_no_change():
    w, _, h = _problem()
    keep = torch.ones_like(w, dtype=torch.bool)
    assert torch.allclose(least_squares_update(w, keep, h), w, atol=1e-5)


def test_update_keeps_zeros_and_lowers_output_error():
    w, x, h = _problem()
    for pattern in (Unstructured(0.5), NM(2, 4)):
        keep = pattern.mask(w.abs() * x.square().mean(0).sqrt())
        masked = w * keep
        updated = least_squares_update(w, keep, h, ridge=1e-6, iters=200)
        assert torch.equal(updated == 0, ~keep)
        err_mask = ((w - masked) @ x.T).square().sum()
        err_obs = ((w - updated) @ x.T).square().sum()
        assert err_obs < 0.7 * err_mask
        # the exact per-row solution of the masked least-squares problem
        exact = torch.zeros_like(w)
        for r in range(w.shape[0]):
            s = keep[r]
            exact[r, s] = torch.linalg.solve(h[s][:, s], h[s] @ w[r])
        err_exact = ((w - exact) @ x.T).square().sum()
        assert torch.isclose(err_obs, err_exact, rtol=1e-3)


def test_hessian_hooks_accumulate_inputs():
    lin = torch.nn.Linear(8, 3)
    h: dict[str, torch.Tensor] = {}
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    with hessian_hooks({"l": lin}, h):
        for x in xs:
            lin(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs])
    assert torch.allclose(h["l"], flat.T @ flat, atol=1e-4)
    lin(xs[0])  # hooks removed: no further accumulation
    assert torch.allclose(h["l"], flat.T @ flat, atol=1e-4)


def test_dead_inputs_are_handled():
    w, x, h = _problem()
    x[:, 3] = 0
    h = x.T @ x
    keep = Unstructured(0.5).mask(w.abs())
    updated = least_squares_update(w, keep, h)
    assert torch.isfinite(updated).all() and torch.equal(updated == 0, ~keep | (updated == 0))
