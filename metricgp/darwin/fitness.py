"""Fitness of a level genome: KL(dense || pruned) on calibration windows (or another `FITNESSES` entry).

The evaluator follows the backends' interface (`evaluate(candidate, n_windows) -> FitnessResult`),
so offspring run serially or on Ray actors exactly as metric candidates do. A `Candidate` with
`train_tokens > 0` is fine-tuned first (training-aware selection, DarwinLM) on a physically shrunk
copy, so pruned structures stay pruned; otherwise the genome is masked on the dense model, only
the genes that changed since the previous candidate being swapped.

`Recipe` is everything an evaluator is built from (picklable: each Ray actor builds its own). The
dense reference is computed once per evaluator.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from metricgp.darwin.levels import Genome, LevelSpace
from metricgp.darwin.masking import StructuredMasks
from metricgp.darwin.unstructured import UnstructuredMasks
from metricgp.data import parse_data_ref, windows
from metricgp.errors import MetricGPError
from metricgp.evaluate import FITNESSES, EvaluatorSpec, FitnessResult, PruningSetup, cached_reference
from metricgp.recover import build_teacher, get_loss, training_windows
from metricgp.structured.evaluator import StructuredPruner
from metricgp.structured.recover import recover
from metricgp.structured.refit import UPDATES, check_update


@dataclass(frozen=True)
class Candidate:
    genome: Genome
    train_tokens: int = 0  # fine-tune a shrunk copy for this many tokens before scoring


@dataclass(frozen=True)
class Training:
    """In-loop fine-tuning of a candidate (metricgp.structured.recover): "lora" (the default) trains an
    adapter and merges it; DarwinLM trains every parameter with AdamW at lr 1e-5 ("full"); `loss` "kd" or
    "ce+kd" distils from the dense model."""

    method: str = "lora"
    lr: float | None = None  # None: the method's default
    batch_size: int = 1
    seed: int = 0
    loss: str = "ce"


@dataclass(frozen=True)
class Recipe:
    """What an evaluator is built from. `fitness_seed` and `train_seed` draw calibration windows
    (never the test split) for scoring and for in-loop training."""

    spec: EvaluatorSpec
    kind: str  # a key of MASKS: "structured" | "unstructured"
    database: Any  # LevelDatabase | UnstructuredDatabase
    fitness: str = "kl"
    fitness_data: str = "c4"
    fitness_windows: int = 8
    fitness_seed: int = 2
    train_tokens: int = 0  # the largest in-loop budget (0: no training)
    train_seed: int = 1
    training: Training = field(default_factory=Training)
    grads: bool = False  # the statistics need G (a metric using it, for unstructured masks)
    update: str = "none"  # structured: the levels' weight update (`metricgp.structured.refit.UPDATES`)

    def __call__(self) -> LevelEvaluator:
        return build_evaluator(self)


def structured_masks(setup: PruningSetup, database, update: str = "none"):
    pruner = StructuredPruner(setup)
    return StructuredMasks(pruner, database, UPDATES[check_update(update)](pruner))


def _unstructured_masks(setup: PruningSetup, database, update: str = "none"):
    if update != "none":
        raise MetricGPError("a weight update of the levels needs structured pruning (--unstructured has "
                            "--reconstruct for the final comparison)")
    return UnstructuredMasks(setup, database)


# space kind -> fn(setup, database, update) -> masks with apply(genome) / reset() / build(genome)
MASKS: dict[str, Callable[..., Any]] = {
    "structured": structured_masks,
    "unstructured": _unstructured_masks,
}


def calibration_windows(setup: PruningSetup, data: str, n: int, seed: int) -> torch.Tensor:
    """`n` seeded random windows of the calibration split of `data`."""
    ref = parse_data_ref(data, "calibration")
    return windows(ref, setup.tokenizer, "calibration", setup.spec.seqlen, n, seed)


class LevelEvaluator:
    """`fitness_windows`: the scoring windows themselves, instead of drawing the recipe's from its fitness
    data (a random-weight model without a tokenizer, as the memory benchmarks use)."""

    def __init__(self, recipe: Recipe, setup: PruningSetup, fitness_windows: torch.Tensor | None = None):
        if recipe.fitness not in FITNESSES:
            raise MetricGPError(f"unknown fitness '{recipe.fitness}' (choose from {', '.join(FITNESSES)})")
        self.recipe = recipe
        self.setup = setup
        self.space: LevelSpace = recipe.database.space
        self.masks = MASKS[recipe.kind](setup, recipe.database, recipe.update)
        self.masks.reset()
        self.objective = FITNESSES[recipe.fitness]
        self.windows = fitness_windows if fitness_windows is not None else calibration_windows(
            setup, recipe.fitness_data, recipe.fitness_windows, recipe.fitness_seed)
        self.fidelities = (len(self.windows),)
        self.reference = cached_reference(setup, self.windows, self.objective.reference)
        self.train_windows, self.teacher = None, None
        if recipe.train_tokens:
            self.train_windows = training_windows(recipe.fitness_data, setup.tokenizer, setup.spec.seqlen,
                                                  recipe.train_tokens, recipe.train_seed)
            if get_loss(recipe.training.loss).needs_teacher:  # the model is dense here (masks reset above)
                self.teacher = build_teacher(setup.model, self.train_windows, fingerprint=setup.fingerprint,
                                             progress=False)
        self.timings: dict[str, float] = defaultdict(float)
        self.swapped = 0  # genes re-masked over all evaluations

    def evaluate(self, candidate: Candidate, n_windows: int) -> FitnessResult:
        t0 = time.perf_counter()
        genome = self.space.check(candidate.genome)
        windows = self.windows[:n_windows]
        if candidate.train_tokens:
            model = self.trained(genome, candidate.train_tokens)
        else:
            self.swapped += self.masks.apply(genome)
            model = self.setup.model
        t1 = time.perf_counter()
        self.timings["prepare"] += t1 - t0
        value = self.objective.measure(model, windows, self.reference, self.setup.spec.batch_size)
        self.timings["forward"] += time.perf_counter() - t1
        reason = None if math.isfinite(value) else "non-finite fitness"
        return FitnessResult(value if math.isfinite(value) else math.inf, len(windows), reason,
                             time.perf_counter() - t0, 1 - self.space.kept_fraction(genome))

    def trained(self, genome: Genome, tokens: int):
        """A physically shrunk copy of the genome, fine-tuned on calibration windows for `tokens`."""
        if self.train_windows is None or tokens > self.recipe.train_tokens:
            raise MetricGPError(f"in-loop training of {tokens} tokens exceeds the recipe's {self.recipe.train_tokens}")
        model = self.masks.build(genome)
        t = self.recipe.training
        recover(model, self.train_windows, method=t.method, tokens=tokens, lr=t.lr, batch_size=t.batch_size,
                seed=t.seed, progress=False, loss=t.loss, teacher=self.teacher)
        return model


def build_evaluator(recipe: Recipe, setup: PruningSetup | None = None) -> LevelEvaluator:
    """The evaluator on `setup` (serial: the driver's model) or on a freshly loaded one (Ray)."""
    if setup is None:
        setup = PruningSetup.from_spec(recipe.spec, grads=recipe.grads)
    return LevelEvaluator(recipe, setup)
