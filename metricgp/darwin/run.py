"""A level-search run in a directory: start, drive generation by generation, checkpoint, resume, finish.

    start(config, out)      build the database and start genome (errors before anything is written),
                            write config.json + database.json, score generation 0, then `drive`
    resume(out, overrides)  the checkpoint's config (generations, backend, workers, the time budget
                            and the final report's reconstruct rows may change), the stored
                            database, the search state; then `drive`
    drive(...)              generations with a progress bar; after each: log.jsonl, best.json and
                            the checkpoint; at the end `finish`: plots, the final model, README.md

Resumed runs continue exactly: the database is read back, not rebuilt, and the search state (RNG,
parent, fitness cache) is restored; evaluation is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

from metricgp.darwin import artifacts
from metricgp.darwin import final as final_model
from metricgp.darwin.config import DATABASE, DarwinConfig, Prepared, prepare
from metricgp.darwin.fitness import build_evaluator
from metricgp.darwin.search import LevelSearch, backend_scorer
from metricgp.darwin.stages import schedule_dict
from metricgp.provenance import write_json_atomic
from metricgp.search import loop
from metricgp.search.artifacts import append_log, rewrite_log
from metricgp.search.backends import make_backend
from metricgp.search.checkpoint import load_checkpoint, save_checkpoint
from metricgp.search.steady import default_lag
from metricgp.structured.groups import discover, linears_by_name
from metricgp.structured.refit import hessian_bytes
from metricgp.zeroshot import ZeroShot

# what a resume may change: how long and where it runs, and (final report only) the reconstruct rows and
# the zero-shot accuracy
RESUMABLE = ("generations", "backend", "workers", "gpus_per_worker", "ray_address", "time_budget_min", "reconstruct",
             "zero_shot", "zero_shot_limit", "zero_shot_batch_size")


@dataclasses.dataclass
class Run:
    config: DarwinConfig
    prep: Prepared
    search: LevelSearch
    backend: Any
    zero_shot: ZeroShot | None = None  # the final report's, checked before the model loaded


def _backend(config: DarwinConfig, prep: Prepared):
    recipe = config.recipe(prep.database)
    if config.backend == "serial":  # on the driver's model: no second copy
        return make_backend("serial", functools.partial(build_evaluator, recipe, prep.setup))
    # an evaluator on the driver's model computes and caches the dense reference once, before any worker
    # starts (the statistics were cached by `prepare`); workers only read both
    build_evaluator(recipe, prep.setup)
    return make_backend(config.backend, recipe, config.workers, config.gpus_per_worker, config.ray_address)


def _run(config: DarwinConfig, prep: Prepared, start, zero_shot: ZeroShot | None) -> Run:
    backend = _backend(config, prep)
    search = LevelSearch(prep.space, config.search_config(), backend_scorer(backend, config.schedule()), start,
                         prep.prior, backend=backend, dispatch=config.dispatch,
                         lag=config.lag)
    return Run(config, prep, search, backend, zero_shot)


def start(config: DarwinConfig, out: Path, provenance: dict[str, Any] | None = None, progress: bool = False,
          stop_after: int | None = None) -> LevelSearch:
    out = loop.fresh_dir(out)
    config.validate()
    if config.dispatch == "async" and config.lag is None:  # fixed now: the results depend on it
        config = dataclasses.replace(config, lag=default_lag(config.workers))
    t0 = time.monotonic()
    zero_shot = config.zero_shot_evaluation()  # lm-eval missing, an unknown task: before the model loads
    prep = prepare(config)  # an unreachable target fails here, before anything is written
    run = _run(config, prep, prep.start, zero_shot)  # and a backend that cannot start (Ray, GPUs) fails here too
    try:
        out.mkdir(parents=True, exist_ok=True)
        stored = prep.database.save(out / DATABASE)
        bytes_per_param = next(prep.setup.model.parameters()).element_size()
        calib_seed = config.spec.get("seed", 0)
        update: dict[str, Any] = {}
        if config.update != "none":  # what the update stores: one Hessian per output projection, no weights

            model = prep.setup.model
            update = {"update": config.update, "update_bytes": hessian_bytes(discover(model), linears_by_name(model))}
        write_json_atomic(out / "config.json", {
            "config": config.to_dict(), "schedule": schedule_dict(config.schedule()),
            "fitness_windows": {"data": config.fitness_data, "split": "calibration", "seed": calib_seed + 2},
            "train_windows_seed": calib_seed + 1,
            "database": {"file": DATABASE, **prep.database.disk_report(stored, bytes_per_param), **update,
                         "genes": len(prep.space.genes),
                         "kinds": {k: {"genes": len(i), "step_params": prep.space.step(k),
                                       "max_level": max(prep.space.genes[j].max_level for j in i)}
                                   for k, i in prep.space.kinds().items()}},
            "start": {"genome": list(prep.start), "kept": prep.space.kept_fraction(prep.start),
                      "budget_params": prep.budget, "removed_params": prep.space.removed(prep.start)},
            **(provenance or {})})
        rewrite_log(out, [])
        rec = run.search.initialize()
        append_log(out, rec)
        _checkpoint(run, out)
        return drive(run, out, progress, stop_after, t0)
    finally:
        run.backend.close()


def resume(out: Path, overrides: dict[str, Any] | None = None, progress: bool = False,
           stop_after: int | None = None, provenance: dict[str, Any] | None = None) -> LevelSearch:
    out = Path(out)
    payload = load_checkpoint(out)
    overrides = loop.check_overrides(overrides, RESUMABLE)
    config = dataclasses.replace(DarwinConfig.from_dict(payload["config"]), **overrides).validate()
    zero_shot = config.zero_shot_evaluation()
    prep = prepare(config, db_path=out / DATABASE)
    state = payload["search"]
    run = _run(config, prep, tuple(state["parent"]), zero_shot)
    try:
        run.search.load_state_dict(state)
        rewrite_log(out, run.search.records)
        _note_resume(out, run.search.gen, overrides, provenance)
        return drive(run, out, progress, stop_after)
    finally:
        run.backend.close()


def _note_resume(out: Path, gen: int, overrides: dict[str, Any], provenance: dict[str, Any] | None) -> None:
    """config.json keeps the first command; every resume is appended with what it changed."""
    path = out / "config.json"
    payload = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    payload.setdefault("resumes", []).append({"from_generation": gen, "overrides": overrides,
                                              "command": (provenance or {}).get("command")})
    write_json_atomic(path, payload)


def _checkpoint(run: Run, out: Path) -> None:
    s = run.search
    artifacts.write_best(out, run.prep.space, s.parent, s.fitness, s.gen, run.prep.database)
    save_checkpoint(out, run.config.to_dict(), s.state_dict())


def drive(run: Run, out: Path, progress: bool = False, stop_after: int | None = None,
          t0: float | None = None) -> LevelSearch:
    search, config = run.search, run.config
    stopped = loop.drive(search.step, lambda: search.gen, config.generations, out, lambda: _checkpoint(run, out),
                         lambda rec: {"fitness": f"{rec['fitness']:.4g}", "kept": f"{rec['kept']:.3f}"},
                         name=config.name, budget_min=config.time_budget_min, progress=progress,
                         stop_after=stop_after, t0=t0)
    finish(run, out, stopped, final=stop_after is None or search.gen >= config.generations)
    return search


def finish(run: Run, out: Path, stopped: str, final: bool = True) -> None:
    """Plots and summary; with `final`, the winner as a model and report.json."""
    search, config, prep = run.search, run.config, run.prep
    artifacts.write_plots(out, search.records, prep.space, search.parent, config.fitness)
    report = None
    if final:
        if config.unstructured:
            evaluator = getattr(run.backend, "evaluator", None) if config.backend == "serial" else None
            evaluator = evaluator or build_evaluator(config.recipe(prep.database), prep.setup)
            report = final_model.unstructured_model(config, prep, search.parent, out, evaluator, run.zero_shot)
        else:
            report = final_model.structured_model(config, prep, search.parent, out, run.zero_shot)
        report = {"genome": list(search.parent), "fitness": search.fitness, "stopped": stopped,
                  "spearman_predicted_vs_first_stage_all": search.spearman_all(), **report}
        write_json_atomic(out / "report.json", report)
    artifacts.write_summary(out, config.to_dict(), search.records, stopped, search.spearman_all(), report)
