"""A cheap, model-free, deterministic fitness for tests and demos.

A few random linear layers stand in for a model. Inputs have heavy-tailed per-feature scales (as
LLM activations do), so the best metric is not plain magnitude: the output error of dropping
weight (i, j) is about |W_ij| * ||x_j||, Wanda's score. The statistics mirror the real ones:
W is the signed weight, X the mean squared input per feature on calibration batches, G a
per-weight "gradient norm" that is |W|-and-X-correlated noise.

Fitness: mean over layers of ||(W - W*mask) x||_F / ||W x||_F on the first `n_windows` held-out
input batches, where the mask keeps the top (1 - sparsity) of each row by score (stable tie-break).
Everything is computed from `seed` alone, so two processes (Ray actors, a resumed run) agree.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass

import torch

from metricgp.evaluate import FitnessResult
from metricgp.expr.compile import compile_metric
from metricgp.expr.ops import leaves_from
from metricgp.expr.tree import Node


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    shapes: tuple[tuple[int, int], ...] = ((32, 64), (64, 32), (48, 96), (96, 48))
    tokens: int = 8  # rows per input batch ("window")
    n_calib: int = 4  # calibration batches for X and G
    fidelities: tuple[int, ...] = (2, 4, 8)
    sparsity: float = 0.5
    delay: float = 0.0  # seconds slept per evaluation, to imitate an expensive evaluator
    # and per window not run before for this candidate (a real evaluator keeps the losses of the windows it
    # ran, so a promoted candidate runs only its new ones)
    delay_per_window: float = 0.0
    # the sleep times exp(jitter * z), z a standard normal drawn from the candidate's formula: some candidates
    # straggle, always the same ones (the fitness never depends on it)
    delay_jitter: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _input_leaves(calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every registered input leaf of one synthetic layer, from its calibration inputs."""
    out = {}
    for name, lf in leaves_from("inputs").items():
        state = lf.statistic.start((calib.shape[1],), calib.device)
        lf.statistic.add(state, calib)
        out[name] = lf.statistic.finish(state, calib.shape[0])
    return out


class SyntheticEvaluator:
    """Implements the `MetricEvaluator` protocol without a model."""

    scope = "tensor"  # per-row masks of each layer: OOS may strip any rank-preserving root transform

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.fidelities = tuple(spec.fidelities)
        self._windows_seen: dict[str, int] = {}
        gen = torch.Generator().manual_seed(spec.seed)
        n_eval = max(self.fidelities)
        self.layers: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        for out_f, in_f in spec.shapes:
            w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f)
            # heavy-tailed per-feature scale: |student-t(2)|-like, a few outlier features
            scale = (torch.randn(in_f, generator=gen, dtype=torch.float64)
                     / torch.randn(in_f, generator=gen, dtype=torch.float64).abs().clamp_min(0.05)).abs()
            scale = scale.clamp(0.05, 50.0)

            def inputs(n: int, scale=scale, in_f=in_f) -> torch.Tensor:
                return torch.randn(n * spec.tokens, in_f, generator=gen, dtype=torch.float64) * scale

            input_leaves = _input_leaves(inputs(spec.n_calib).float())  # the statistics pass runs in float32
            noise = torch.exp(0.75 * torch.randn(out_f, in_f, generator=gen, dtype=torch.float64))
            g_stat = w.abs() * input_leaves["X"].double().sqrt() * noise
            stats = {"W": w.float(), **input_leaves, "G": g_stat.float()}
            self.layers.append((stats, inputs(n_eval)))

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        n_in = scores.shape[1]
        n_drop = int(round(n_in * self.spec.sparsity))
        order = torch.argsort(scores, dim=1, descending=False, stable=True)
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(1, order[:, :n_drop], False)
        return mask

    def _sleep(self, tree: Node, n_windows: int) -> int:
        """Imitates the cost of a real evaluation; returns the windows "run" (those not run before)."""
        key = str(tree)
        ran = max(n_windows - self._windows_seen.get(key, 0), 0)
        self._windows_seen[key] = max(self._windows_seen.get(key, 0), n_windows)
        delay = self.spec.delay + self.spec.delay_per_window * ran
        if delay and self.spec.delay_jitter:
            z = torch.randn(1, generator=torch.Generator().manual_seed(zlib.crc32(key.encode()))).item()
            delay *= math.exp(self.spec.delay_jitter * z)
        if delay:
            time.sleep(delay)
        return ran

    def evaluate(self, tree: Node, n_windows: int) -> FitnessResult:
        t0 = time.perf_counter()
        ran = self._sleep(tree, n_windows)
        fn = compile_metric(tree)
        errors, kept, total = [], 0, 0
        for stats, xs in self.layers:
            scores = fn(stats)
            if not torch.isfinite(scores).all():
                return FitnessResult(math.inf, n_windows, "non-finite scores", time.perf_counter() - t0, 0.0, ran)
            if bool((scores.amax(1) == scores.amin(1)).all()):
                return FitnessResult(math.inf, n_windows, "constant scores in every row",
                                     time.perf_counter() - t0, 0.0, ran)
            mask = self._mask(scores)
            kept += int(mask.sum())
            total += mask.numel()
            w = stats["W"].double()
            x = xs[: n_windows * self.spec.tokens]
            dense = x @ w.T
            err = x @ (w * ~mask).T
            errors.append(float(err.norm() / dense.norm()))
        return FitnessResult(sum(errors) / len(errors), n_windows, None, time.perf_counter() - t0,
                             1.0 - kept / total, ran)


def build_synthetic(spec: SyntheticSpec) -> SyntheticEvaluator:
    return SyntheticEvaluator(spec)
