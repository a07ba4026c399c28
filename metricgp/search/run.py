"""A search run in a directory: start, drive generation by generation, checkpoint, resume.

`RunConfig` is everything that defines a run (plain, picklable); `evaluator_factory` is the one
place that turns it into an evaluator factory, so wiring the model evaluator differently is a
change to that function alone.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metricgp.errors import MetricGPError
from metricgp.evaluate import EvaluatorSpec, build_evaluator
from metricgp.refit_fitness import RefitResidualEvaluator
from metricgp.search import artifacts, loop
from metricgp.search.backends import Backend, EvaluatorFactory, make_backend
from metricgp.search.checkpoint import load_checkpoint, save_checkpoint
from metricgp.search.gp import GPSearch
from metricgp.search.space import SearchSpace, space_from_dict
from metricgp.search.steady import default_lag
from metricgp.search.synthetic import SyntheticSpec, build_synthetic
from metricgp.structured.evaluator import StructuredSpec
from metricgp.structured.fitness import StructuredMetricEvaluator

# what a resume may change: how long and where it runs, never what it computes
RESUMABLE = ("generations", "backend", "workers", "gpus_per_worker", "ray_address", "time_budget_min")


@dataclass(frozen=True)
class RunConfig:
    space: SearchSpace
    evaluator: str = "synthetic"  # a key of EVALUATORS
    evaluator_spec: dict[str, Any] = dataclasses.field(default_factory=dict)  # fields of its spec class
    backend: str = "serial"
    workers: int = 1
    gpus_per_worker: float = 0.0
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray
    dispatch: str = "sync"  # or "async" (metricgp.search.steady)
    lag: int | None = None  # async: jobs created ahead of integration (None: 2 x workers)
    time_budget_min: float | None = None
    name: str = "run"
    references: tuple[str, ...] = ()  # metrics scored on the same windows, for the report only

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        raw = dict(raw)
        space_raw = dict(raw.pop("space"))
        source = space_raw.pop("source", "<checkpoint>")
        space = dataclasses.replace(space_from_dict(space_raw, f"{source} (from checkpoint)"), source=source)
        raw["references"] = tuple(raw.get("references", ()))
        return cls(space=space, **raw)


def _synthetic(spec: dict[str, Any]) -> EvaluatorFactory:
    if "shapes" in spec:
        spec["shapes"] = tuple(tuple(s) for s in spec["shapes"])
    return functools.partial(build_synthetic, SyntheticSpec(**spec))


def _model(spec: dict[str, Any]) -> EvaluatorFactory:
    return functools.partial(build_evaluator, EvaluatorSpec(**spec))


# evaluator name -> fn(spec fields) -> a picklable evaluator factory; one entry adds an evaluator.
def _structured(spec: dict[str, Any]) -> EvaluatorFactory:
    spec = dict(spec)
    structured = StructuredSpec(**spec.pop("structured", {})).validate()
    return functools.partial(StructuredMetricEvaluator, EvaluatorSpec(**spec), structured)


def _refit(spec: dict[str, Any]) -> EvaluatorFactory:
    return functools.partial(RefitResidualEvaluator, EvaluatorSpec(**spec))


EVALUATORS: dict[str, Callable[[dict[str, Any]], EvaluatorFactory]] = {
    "model": _model,  # prune a language model one-shot, fitness on validation text
    "refit": _refit,  # output residual after reconstruct mode's least-squares refit; fidelity = blocks sampled
    "structured": _structured,  # remove heads/channels by the metric's structure importance (scope "global")
    "synthetic": _synthetic,  # model-free, for tests and demos
}


def evaluator_factory(config: RunConfig) -> EvaluatorFactory:
    """A picklable zero-argument callable building the run's evaluator (once per worker).

    The evaluator's fidelities are the space's `fidelity.windows` unless the spec names its own.
    """
    if config.evaluator not in EVALUATORS:
        raise MetricGPError(f"unknown evaluator {config.evaluator!r} (choose from {', '.join(EVALUATORS)})")
    spec = dict(config.evaluator_spec)
    spec.setdefault("fidelities", tuple(config.space.fidelity.windows))
    spec["fidelities"] = tuple(spec["fidelities"])
    return EVALUATORS[config.evaluator](spec)


def warm_caches(config: RunConfig) -> None:
    """Build one evaluator in this process and drop it: it computes and caches what every evaluator
    reads (the model's statistics), so that workers started afterwards only read the cache instead of
    each computing the same statistics at once."""
    evaluator_factory(config)()
    gc.collect()
    if torch.cuda.is_available():  # hand the driver's cached GPU memory back before the workers need it
        torch.cuda.empty_cache()


def _backend(config: RunConfig) -> Backend:
    if config.backend != "serial":  # statistics once, on the driver, before any worker starts
        warm_caches(config)
    return make_backend(config.backend, evaluator_factory(config), config.workers, config.gpus_per_worker,
                        config.ray_address)


def start(config: RunConfig, run_dir: Path, provenance: dict[str, Any] | None = None,
          progress: bool = False, stop_after: int | None = None) -> GPSearch:
    """A fresh run in `run_dir` (which must not hold a checkpoint already)."""
    run_dir = loop.fresh_dir(run_dir)
    t0 = time.monotonic()
    if config.dispatch == "async" and config.lag is None:  # fixed now: the results depend on it
        config = dataclasses.replace(config, lag=default_lag(config.workers))
    backend = _backend(config)  # before the directory exists: a backend that cannot start leaves nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        search = GPSearch(config.space, backend, backend.fidelities(), references=config.references,
                          dispatch=config.dispatch, lag=config.lag)
        payload = {"config": config.to_dict(), "seed": config.space.gp.seed, "fidelities": search.fidelities,
                   **(provenance or {})}
        artifacts.write_json(run_dir / "config.json", payload)
        artifacts.rewrite_log(run_dir, [])
        artifacts.append_log(run_dir, search.initialize())
        _checkpoint(search, config, run_dir)
        return drive(search, config, run_dir, progress, stop_after, t0)
    finally:
        backend.close()


def resume(run_dir: Path, overrides: dict[str, Any] | None = None, progress: bool = False,
           stop_after: int | None = None) -> GPSearch:
    """Continue a run from its checkpoint. `overrides` may change what `RESUMABLE` names (nothing
    that would change the results)."""
    run_dir = Path(run_dir)
    payload = load_checkpoint(run_dir)
    config = RunConfig.from_dict(payload["config"])
    overrides = loop.check_overrides(overrides, RESUMABLE)
    if "generations" in overrides:
        gp_params = dataclasses.replace(config.space.gp, generations=overrides.pop("generations"))
        config = dataclasses.replace(config, space=dataclasses.replace(config.space, gp=gp_params))
    config = dataclasses.replace(config, **overrides)
    backend = _backend(config)
    try:
        search = GPSearch(config.space, backend, payload["search"]["fidelities"], references=config.references,
                          dispatch=config.dispatch, lag=config.lag)
        search.load_state_dict(payload["search"])
        artifacts.rewrite_log(run_dir, list(search.records))
        return drive(search, config, run_dir, progress, stop_after)
    finally:
        backend.close()


def _checkpoint(search: GPSearch, config: RunConfig, run_dir: Path) -> None:
    artifacts.write_results(run_dir, config.name, search.hof, search.cache, search.fidelities, search.gen)
    save_checkpoint(run_dir, config.to_dict(), search.state_dict())


def drive(search: GPSearch, config: RunConfig, run_dir: Path, progress: bool = False,
          stop_after: int | None = None, t0: float | None = None) -> GPSearch:
    """`loop.drive` over the GP's generations (log, results and checkpoint after each); then plots
    and the summary."""
    stopped = loop.drive(search.step, lambda: search.gen, config.space.gp.generations, run_dir,
                         lambda: _checkpoint(search, config, run_dir),
                         lambda r: {"best": "-" if r["best_fitness"] is None else f"{r['best_fitness']:.4g}",
                                    "div": f"{r['diversity']:.2f}"}, name=config.name,
                         budget_min=config.time_budget_min, progress=progress, stop_after=stop_after, t0=t0)
    finish(search, config, run_dir, stopped)
    return search


def finish(search: GPSearch, config: RunConfig, run_dir: Path, stopped: str) -> None:
    records = list(search.records)
    artifacts.write_plots(run_dir, records, search.cache, search.fidelities)
    entries = artifacts.hall_of_fame_entries(search.hof, search.cache, search.fidelities)
    artifacts.write_summary(run_dir, config.name, records, entries, dict(search.counters), stopped)
