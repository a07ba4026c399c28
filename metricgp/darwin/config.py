"""Everything that defines a level-search run (`DarwinConfig`, plain and picklable), and `prepare`:
the loaded model, its level database, the metric prior and the start genome.

Seeds: `spec["seed"]` (--calib-seed) draws the statistics' calibration windows; fitness windows
use calib-seed + 2 and in-loop training windows calib-seed + 1, all from the calibration split of
`fitness_data` (never a test split); `seed` (--search-seed) drives mutation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metricgp.darwin.database import LevelDatabase, build_database
from metricgp.darwin.fitness import Recipe, Training
from metricgp.darwin.levels import Genome, LevelSpace, start_genome
from metricgp.darwin.owl import owl_layer_sparsities
from metricgp.darwin.prior import MetricPrior, allocation_start, structured_prior
from metricgp.darwin.search import SearchConfig
from metricgp.darwin.stages import Stage, make_schedule
from metricgp.darwin.unstructured import UnstructuredDatabase, build_unstructured
from metricgp.data import parse_data_ref, parse_report_data
from metricgp.errors import MetricGPError
from metricgp.evaluate import FITNESSES, EvaluatorSpec, PruningSetup
from metricgp.expr import parse
from metricgp.recover import LOSSES, SCHEDULES
from metricgp.search.backends import BACKENDS
from metricgp.search.steady import DISPATCHES
from metricgp.structured.evaluator import StructuredPruner, StructuredSpec
from metricgp.structured.recover import RECOVERY_METHODS
from metricgp.structured.refit import check_update
from metricgp.zeroshot import ZeroShot

DATABASE = "database.json"


@dataclass(frozen=True)
class DarwinConfig:
    spec: dict[str, Any]  # EvaluatorSpec fields: model, dtype, device, calib, n_calib, seqlen, seed
    metric: str  # functional formula: unit importance (structured) or weight scores (unstructured)
    metric_source: str = "command line"
    unstructured: bool = False
    keep: float = 0.6  # structured: fraction of decoder parameters kept
    sparsity: float = 0.7  # unstructured: fraction of prunable weights removed
    levels: int = 10
    reduction: str = StructuredSpec.reduction  # the structured evaluator's defaults (chosen by experiment)
    normalisation: str = StructuredSpec.normalisation
    head_mode: str = StructuredSpec.head_mode
    stages: tuple[dict[str, int], ...] = ({"survivors": 4, "windows": 2, "train_tokens": 0},
                                          {"survivors": 1, "windows": 8, "train_tokens": 0})
    offspring: int = 16
    generations: int = 50
    seed: int = 0
    prior: bool = True  # metric prior: start genome, mutation bias, screening
    screen: int | None = None  # children sent to the first stage (with the prior); None: all
    fitness: str = "kl"
    fitness_data: str = "c4"
    train_method: str = "lora"  # in-loop training: an adapter, not a second fp32 copy and AdamW state at 8B
    train_lr: float | None = None
    train_loss: str = "ce"  # in-loop training: ce, kd or ce+kd (`metricgp.recover.LOSSES`)
    backend: str = "serial"
    workers: int = 1
    gpus_per_worker: float = 0.0  # GPUs each Ray actor asks for; Ray hides the GPUs from an actor that asks none
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray
    dispatch: str = "sync"  # or "async" (metricgp.search.steady)
    lag: int | None = None  # async: jobs created ahead of integration (None: 2 x workers)
    time_budget_min: float | None = None
    recover_tokens: int = 0
    recover_method: str = "lora"
    recover_lr: float | None = None
    recover_loss: str = "ce"
    recover_schedule: str = "constant"
    recover_warmup: float = 0.0
    recover_checkpointing: bool = False  # gradient checkpointing in the final recovery (same training)
    dataset: str = "wikitext2"
    eval_windows: int = 32
    save_model: bool = True
    dense_eval: bool = True
    reconstruct: bool = False  # unstructured: also every allocation + least-squares reconstruction
    update: str = "none"  # structured: each level's weight update (`metricgp.structured.refit.UPDATES`)
    speed: bool = True  # structured: prefill/decode throughput of the final model vs dense
    zero_shot: str | None = None  # final report: lm-eval tasks (metricgp.zeroshot), dense and final model
    zero_shot_limit: int | None = None
    zero_shot_batch_size: int = 1
    name: str = "darwin"

    @property
    def kind(self) -> str:
        return "unstructured" if self.unstructured else "structured"

    def schedule(self) -> tuple[Stage, ...]:
        return make_schedule([s["survivors"] for s in self.stages], [s["windows"] for s in self.stages],
                             [s.get("train_tokens", 0) for s in self.stages])

    def search_config(self) -> SearchConfig:
        return SearchConfig(self.schedule(), self.offspring, self.generations, self.seed,
                            self.screen if self.prior else None, self.prior)

    def recipe(self, database) -> Recipe:
        stages = self.schedule()
        return Recipe(EvaluatorSpec(**self.spec), self.kind, database, self.fitness, self.fitness_data,
                      max(s.windows for s in stages), self.spec.get("seed", 0) + 2,
                      max(s.train_tokens for s in stages), self.spec.get("seed", 0) + 1,
                      Training(self.train_method, self.train_lr, 1, self.seed, self.train_loss), self.uses_grads(),
                      self.update)

    def uses_grads(self) -> bool:
        return "G" in parse(self.metric).leaves_used()

    def validate(self) -> DarwinConfig:
        if not self.unstructured and not 0.0 < self.keep <= 1.0:
            raise MetricGPError(f"--keep must be in (0, 1], got {self.keep}")
        if self.unstructured and not 0.0 < self.sparsity < 1.0:
            raise MetricGPError(f"--sparsity must be strictly between 0 and 1, got {self.sparsity}")
        stages = self.schedule()
        if self.unstructured and any(s.train_tokens for s in stages):
            raise MetricGPError("--train-tokens (in-loop training) needs structured pruning: masked weights "
                                "would grow back")
        self.search_config().validate()
        checks = ((self.fitness, FITNESSES, "fitness"), (self.backend, BACKENDS, "backend"),
                  (self.dispatch, DISPATCHES, "dispatch"),
                  (self.train_method, RECOVERY_METHODS, "training method"),
                  (self.recover_method, RECOVERY_METHODS, "recovery method"),
                  (self.train_loss, LOSSES, "training loss"), (self.recover_loss, LOSSES, "recovery loss"),
                  (self.recover_schedule, SCHEDULES, "recovery schedule"))
        for value, choices, what in checks:
            if value not in choices:
                raise MetricGPError(f"unknown {what} '{value}' (choose from {', '.join(choices)})")

        check_update(self.update)
        if self.unstructured and self.update != "none":
            raise MetricGPError("--update needs structured pruning (--unstructured has --reconstruct)")
        if self.workers < 1 or self.recover_tokens < 0 or self.eval_windows < 0:
            raise MetricGPError("--workers must be >= 1, --recover-tokens and --eval-windows >= 0")
        if not 0.0 <= self.recover_warmup < 1.0:
            raise MetricGPError(f"--recover-warmup is a fraction of the steps in [0, 1), got {self.recover_warmup}")
        parse_data_ref(self.fitness_data, "calibration")
        parse_report_data(self.dataset)
        ZeroShot.from_options(self.zero_shot, self.zero_shot_limit, self.zero_shot_batch_size)
        return self

    def zero_shot_evaluation(self) -> ZeroShot | None:
        """The final report's zero-shot evaluation, checked (lm-eval installed, the tasks and their data
        found), or None: called before the model loads."""
        return ZeroShot.from_options(self.zero_shot, self.zero_shot_limit, self.zero_shot_batch_size, check=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DarwinConfig:
        raw = dict(raw)
        raw["stages"] = tuple(dict(s) for s in raw["stages"])
        raw.setdefault("train_method", "full")  # a run written before lora became the default resumes as it began
        return cls(**raw)


@dataclass
class Prepared:
    setup: Any  # PruningSetup
    database: Any  # LevelDatabase | UnstructuredDatabase
    space: LevelSpace
    prior: MetricPrior
    start: Genome
    budget: int  # parameters the target removes


def _load_setup(config: DarwinConfig):
    return PruningSetup.from_spec(EvaluatorSpec(**config.spec), grads=config.uses_grads())


def _structured(config: DarwinConfig, setup, db_path: Path | None):
    if db_path is not None:
        db = LevelDatabase.load(db_path)
    else:
        spec = StructuredSpec(reduction=config.reduction, normalisation=config.normalisation,
                              head_mode=config.head_mode).validate()
        pruner = StructuredPruner(setup)
        meta = {"metric": config.metric, "source": config.metric_source, "reduction": spec.reduction,
                "normalisation": spec.normalisation, "head_mode": spec.head_mode}
        db = build_database(pruner, pruner.score(parse(config.metric), spec), config.levels, meta)
    budget = db.total - round(config.keep * db.total)
    return db, structured_prior(db), budget


def _unstructured(config: DarwinConfig, setup, db_path: Path | None):
    db = UnstructuredDatabase.load(db_path) if db_path is not None else build_unstructured(
        setup, parse(config.metric), config.levels)
    return db, MetricPrior(db.costs), round(config.sparsity * db.total)


def _start(config: DarwinConfig, setup, db, space: LevelSpace, budget: int) -> Genome:
    what = (f"--sparsity {config.sparsity:g}" if config.unstructured else f"--keep {config.keep:g}")
    if not config.prior:
        return start_genome(space, budget, what=what)
    if config.unstructured:  # OWL's outlier-weighted allocation, on the level grid

        return start_genome(space, budget, owl_layer_sparsities(setup, config.sparsity), what=what)
    weights, kinds = allocation_start(db, budget)
    return start_genome(space, budget, weights, kinds, what=what)


def prepare(config: DarwinConfig, db_path: Path | None = None, setup=None) -> Prepared:
    """Load the model and statistics; build the database (or read `db_path`), the prior and the
    start genome. Raises MetricGPError for a target the database cannot reach."""
    setup = setup if setup is not None else _load_setup(config)
    db, prior, budget = (_unstructured if config.unstructured else _structured)(config, setup, db_path)
    space = db.space
    return Prepared(setup, db, space, prior, _start(config, setup, db, space, budget), budget)
