"""The run loop of the metric search and the level search: a fresh run's directory, what a resume may
change (each search's `RESUMABLE`), and `drive`: generations with log, checkpoint and progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metricgp.errors import MetricGPError
from metricgp.search.artifacts import append_log
from metricgp.search.checkpoint import CHECKPOINT


def fresh_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT).exists():
        raise MetricGPError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    return run_dir


def check_overrides(overrides: dict[str, Any] | None, resumable: Iterable[str]) -> dict[str, Any]:
    """The overrides given (None: not given); any outside `resumable` is an error."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if set(overrides) - set(resumable):
        raise MetricGPError(f"--resume cannot change {', '.join(sorted(set(overrides) - set(resumable)))}")
    return overrides


def drive(step: Callable[[], dict], gen: Callable[[], int], total: int, run_dir: Path,
          checkpoint: Callable[[], None], postfix: Callable[[dict], dict], *, name: str,
          budget_min: float | None, progress: bool = False, stop_after: int | None = None,
          t0: float | None = None) -> str:
    """Generations until `total` (or `stop_after` more, or the time budget from `t0` (default now) is
    exceeded), each followed by the log line and `checkpoint()`; returns why it stopped."""
    budget = None if budget_min is None else 60.0 * budget_min
    t0 = time.monotonic() if t0 is None else t0
    stopped, done = "all generations done", 0
    with tqdm(total=total, initial=min(gen(), total), desc=name, unit="gen", disable=not progress) as bar:
        while gen() < total:
            if stop_after is not None and done >= stop_after:
                stopped = f"stopped after {done} generations"
                break
            rec = step()
            done += 1
            append_log(run_dir, rec)
            checkpoint()
            bar.update(1)
            bar.set_postfix(**postfix(rec))
            if budget is not None and time.monotonic() - t0 > budget:
                stopped = f"time budget of {budget_min:g} min exceeded"
                break
    return stopped
