"""The session every command builds (`PruningSetup`) and the metric evaluator the search calls.

`MetricEvaluator.evaluate(tree, n_windows)` is the one fitness entry point: prune the model
one-shot with cached statistics, measure validation perplexity (or KL to dense) on the first
`n_windows` validation windows, restore the dense weights, return a `FitnessResult`. It never
raises for a bad candidate: degenerate metrics get `inf` and a reason. Perplexity and KL
themselves are measured in `metricgp.measure`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metricgp.data import parse_data_ref, windows
from metricgp.errors import MetricGPError
from metricgp.expr import compile_metric, to_functional
from metricgp.fileio import atomic_path
from metricgp.measure import KL_TOPK, DenseReference, WindowLosses, perplexity, window_losses
from metricgp.models import cache_root, checkpoint_tensors, load_model, prunable_layers
from metricgp.offload import compute_device
from metricgp.provenance import json_safe
from metricgp.prune.engine import PRUNE_MODES, DegenerateMetric, DenseWeights, prune_oneshot
from metricgp.prune.patterns import parse_pattern
from metricgp.stats import cached_stats, stats_cached, stats_key


@dataclass(frozen=True)
class FitnessResult:
    fitness: float  # lower is better; math.inf when degenerate
    n_windows: int
    reason: str | None
    seconds: float
    sparsity: float
    windows_run: int | None = None  # windows this call actually ran (earlier ones may be cached); None: unknown


@dataclass(frozen=True)
class EvaluatorSpec:
    """Everything that defines a fitness function; picklable, so Ray actors can rebuild it."""

    model: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    calib: str = "c4"
    n_calib: int = 32
    valid: str = "wikitext2"
    seqlen: int = 512
    seed: int = 0  # the calibration sample's seed (command lines: --calib-seed)
    sparsity: float = 0.5  # must agree with a pattern that fixes its own (N:M)
    pattern: str = "unstructured"
    fitness: str = "ppl"  # a key of FITNESSES
    fidelities: tuple[int, ...] = (2, 8, 32)
    batch_size: int = 4
    offload: bool = False  # decoder blocks in host memory, one at a time on the device (metricgp.offload)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Fitness:
    """One entry of `FITNESSES`: lower is better.

    value:     (per-window losses of the pruned model, n) -> the fitness over the first n windows;
               every fitness is a function of per-window sums, so a candidate promoted to a larger
               fidelity only needs the windows it has not seen yet.
    reference: (dense model, validation windows) -> the dense reference the losses are measured
               against (`window_losses(reference=...)`), built once before any pruning (None: none).
    """

    value: Callable[[WindowLosses, int], float]
    reference: Callable[[nn.Module, torch.Tensor], Any] | None = None
    doc: str = ""

    def measure(self, model: nn.Module, windows: torch.Tensor, reference: Any, batch_size: int = 4) -> float:
        return self.value(window_losses(model, windows, batch_size, reference), len(windows))


# fitness name -> how to measure it; one entry adds a fitness.
FITNESSES: dict[str, Fitness] = {
    "ppl": Fitness(lambda losses, n: losses.perplexity(n), doc="validation perplexity of the pruned model"),
    "kl": Fitness(lambda losses, n: losses.kl_to_dense(n), DenseReference.build,
                  doc="mean per-token KL(dense || pruned) on the validation windows"),
}

PREFIX_CACHE_SIZE = 4096  # candidates whose per-window losses are kept for their next fidelity stage


class MetricEvaluator:
    """Model, cached statistics and validation windows loaded once; many metrics evaluated.

    `scope` names the simplification scope (`metricgp.expr.simplify.SCOPES`) under which two
    metrics with one canonical key get the same fitness here; the search reads it (an evaluator
    that ranks reduced structure scores across layers sets "global")."""

    def __init__(self, spec: EvaluatorSpec, setup: PruningSetup | None = None):
        self._check(spec)
        self.pattern = parse_pattern(spec.pattern, spec.sparsity)
        self.scope = self.pattern.simplify_scope
        self._load(setup)

    def _check(self, spec: EvaluatorSpec) -> None:
        if spec.fitness not in FITNESSES:
            raise MetricGPError(f"unknown fitness '{spec.fitness}' (choose from {', '.join(FITNESSES)})")
        if list(spec.fidelities) != sorted(set(spec.fidelities)) or min(spec.fidelities) < 1:
            raise MetricGPError(f"fidelities must be increasing positive window counts, got {spec.fidelities}")
        self.spec = spec
        self.objective = FITNESSES[spec.fitness]

    def _load(self, setup: PruningSetup | None) -> None:
        """The model, statistics, validation windows and the fitness's dense reference, once."""
        self.setup = setup or PruningSetup.from_spec(self.spec)
        self.valid = self.setup.fitness_windows(max(self.spec.fidelities))
        self.fidelities = tuple(min(f, len(self.valid)) for f in self.spec.fidelities)
        self.reference = cached_reference(self.setup, self.valid, self.objective.reference)
        self.timings: dict[str, float] = defaultdict(float)
        self._seen: dict[str, tuple[WindowLosses, float]] = {}  # formula -> (losses so far, fraction removed)

    def prune_with(self, tree) -> float:
        """Prune the model in place with `tree`; returns the fraction removed. Raises DegenerateMetric."""
        return prune_oneshot(self.setup.dense, self.setup.stats, compile_metric(tree), self.pattern,
                             compute_device(self.setup.model)).sparsity

    def evaluate(self, tree, n_windows: int) -> FitnessResult:
        """Fitness on the first `n_windows` validation windows. A candidate seen before at a lower
        fidelity is pruned again but only its new windows are run (fidelity stages are prefixes)."""

        t0 = time.perf_counter()
        n_windows = min(n_windows, len(self.valid))
        key = to_functional(tree)
        seen, removed = self._seen.pop(key, (None, 0.0))
        done = len(seen.nll) if seen is not None else 0
        ran = max(n_windows - done, 0)
        if done < n_windows:
            try:
                removed = self.prune_with(tree)
            except DegenerateMetric as err:
                self.setup.dense.restore()
                return FitnessResult(math.inf, n_windows, str(err), time.perf_counter() - t0, 0.0, 0)
            t1 = time.perf_counter()
            self.timings["score_mask"] += t1 - t0
            try:
                new = window_losses(self.setup.model, self.valid[done:n_windows], self.spec.batch_size,
                                    self.reference, first=done)
                t2 = time.perf_counter()
                self.timings["forward"] += t2 - t1
                self.timings["windows"] += n_windows - done
            finally:
                self.setup.dense.restore()
            self.timings["restore"] += time.perf_counter() - t2
            seen = new if seen is None else seen.extend(new)
        self._seen[key] = (seen, removed)  # most recently used last
        while len(self._seen) > PREFIX_CACHE_SIZE:
            del self._seen[next(iter(self._seen))]
        value = self.objective.value(seen, n_windows)
        reason = None if math.isfinite(value) else "non-finite fitness"
        fitness = value if math.isfinite(value) else math.inf
        return FitnessResult(fitness, n_windows, reason, time.perf_counter() - t0, removed, ran)


@dataclass
class PruningSetup:
    """A loaded model with its prunable layers, dense weights and cached calibration statistics."""

    model: nn.Module
    tokenizer: object
    layers: dict
    dense: object
    stats: dict
    spec: EvaluatorSpec
    fingerprint: str
    stats_cached: bool
    timings: dict = field(default_factory=dict)
    calib: torch.Tensor | None = None
    model_path: str = ""  # what was loaded (the converted directory for GGUF and the default)

    @classmethod
    def from_spec(cls, spec: EvaluatorSpec, grads: bool = True, inputs: Iterable[str] | None = None) -> PruningSetup:
        """Load the model and its statistics. With grads=False, G is
        still used when a cached gradient pass exists (it holds X too, so it costs nothing). `inputs`: the
        input leaves needed (None: every registered one; `stats.cached_stats`)."""

        t0 = time.perf_counter()
        calib_ref = parse_data_ref(spec.calib, "calibration")
        parse_data_ref(spec.valid, "fitness")  # fail early, before the model loads
        loaded = load_model(spec.model, spec.dtype, spec.device, spec.offload)
        t1 = time.perf_counter()
        layers = prunable_layers(loaded.model)
        calib = windows(calib_ref, loaded.tokenizer, "calibration", spec.seqlen, spec.n_calib, spec.seed)

        def key(with_grads: bool) -> str:
            return stats_key(loaded.fingerprint, str(calib_ref), spec.n_calib, spec.seqlen, spec.seed, with_grads)

        grads = grads or stats_cached(key(True))
        # an offloaded model's statistics stay on disk, read a layer at a time (G alone is 2x a bf16 model)
        stats, was_cached = cached_stats(loaded.model, layers, calib, key(grads), grads=grads, inputs=inputs,
                                         lazy=spec.offload)
        t2 = time.perf_counter()
        dense = DenseWeights(layers, checkpoint_tensors(loaded.path))
        return cls(loaded.model, loaded.tokenizer, layers, dense, stats, spec,
                   loaded.fingerprint, was_cached, {"load_model": t1 - t0, "stats": t2 - t1}, calib, loaded.path)

    def fitness_windows(self, n: int | None) -> torch.Tensor:
        ref = parse_data_ref(self.spec.valid, "fitness")
        return windows(ref, self.tokenizer, "fitness", self.spec.seqlen, n)

    def report_windows(self, data: str, n: int | None) -> torch.Tensor:
        """The first `n` (None: all) test windows of `data`, for reports only."""
        return windows(parse_data_ref(data, "report"), self.tokenizer, "report", self.spec.seqlen, n)

    def prune(self, tree, pattern, mode: str = "oneshot"):
        """Restore the dense weights, then prune with `tree` in `mode`. Returns a PruneReport."""
        if mode not in PRUNE_MODES:
            raise MetricGPError(f"unknown mode '{mode}' (choose from {', '.join(PRUNE_MODES)})")
        self.dense.restore()
        return PRUNE_MODES[mode](self, compile_metric(tree), pattern)


REFERENCE_VERSION = 1


def cached_reference(setup: PruningSetup, valid: torch.Tensor,
                     build: Callable[[nn.Module, torch.Tensor], Any] | None) -> Any:
    """A fitness's dense reference on `valid`, built before any pruning. The KL fitness's top-k reference
    is cached on disk, keyed by the weights and the windows: the driver of a distributed search builds it
    once before any worker starts (`metricgp.search.run.warm_caches`), and the workers read it instead of
    each running the dense model over the windows again."""
    if build is None:
        return None
    fingerprint = getattr(setup, "fingerprint", None)
    if fingerprint is None:  # a setup that cannot name its weights: nothing to key a cache by
        return build(setup.model, valid)
    key = hashlib.sha256(json.dumps({"v": REFERENCE_VERSION, "model": fingerprint, "k": KL_TOPK,
                                     "windows": hashlib.sha256(valid.numpy().tobytes()).hexdigest(),
                                     "shape": list(valid.shape)}).encode()).hexdigest()[:20]
    path = cache_root() / "references" / f"{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        return DenseReference(tensors["top_logp"], tensors["top_idx"])
    reference = build(setup.model, valid)
    if isinstance(reference, DenseReference):  # another kind of reference is not cached
        with atomic_path(path) as tmp:
            save_file({"top_logp": reference.top_logp.contiguous(), "top_idx": reference.top_idx.contiguous()}, tmp)
    return reference


def cached_dense_perplexity(setup: PruningSetup, data: str, windows: torch.Tensor) -> float:
    """The dense model's perplexity on `windows`, cached on disk under the exact weights and
    tokens (every report of the same model and data needs it; it costs as much as the pruned one)."""


    setup.dense.restore()
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    dtype = str(next(setup.model.parameters()).dtype)
    path = cache_root() / "dense_ppl" / f"{setup.fingerprint}-{digest}-{dtype.replace('torch.', '')}.json"
    if path.is_file():
        cached = json.loads(path.read_text())["perplexity"]
        return math.inf if cached is None else float(cached)  # null: non-finite (JSON has no Infinity)
    value = perplexity(setup.model, windows, setup.spec.batch_size, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe({"perplexity": value, "data": data, "windows": len(windows)}),
                               allow_nan=False))
    return value


def build_evaluator(spec: EvaluatorSpec) -> MetricEvaluator:
    return MetricEvaluator(spec)
