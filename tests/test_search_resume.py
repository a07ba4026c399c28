"""Checkpoint and resume: a run stopped (or SIGKILLed) and resumed ends exactly where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metricgp.errors import MetricGPError
from metricgp.search.checkpoint import load_checkpoint
from metricgp.search.run import RunConfig, resume, start
from metricgp.search.space import load_space, with_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"
TIMING = ("seconds", "eval_seconds", "worker_idle_share", "windows_run")  # windows_run: caches die with a process


def _config(generations: int = 10, seed: int = 3, delay: float = 0.0) -> RunConfig:
    space = with_overrides(load_space(TINY), gp={"generations": generations, "seed": seed})
    return RunConfig(space=space, evaluator="synthetic", evaluator_spec={"delay": delay}, name="t")


def _outcome(run_dir: Path) -> tuple[list, list]:
    hof = json.loads((run_dir / "hall_of_fame.json").read_text())["entries"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return hof, [{k: v for k, v in r.items() if k not in TIMING} for r in log]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list, list]:
    run_dir = tmp_path_factory.mktemp("full")
    start(_config(), run_dir)
    return _outcome(run_dir)


def test_stop_and_resume_equals_uninterrupted(tmp_path, uninterrupted):
    search = start(_config(), tmp_path, stop_after=4)
    assert search.gen == 4 and load_checkpoint(tmp_path)["search"]["gen"] == 4
    assert _outcome(tmp_path) != uninterrupted
    search = resume(tmp_path, stop_after=3)
    assert search.gen == 7
    resume(tmp_path)
    assert _outcome(tmp_path) == uninterrupted
    for name in ("best.json", "config.json", "fitness.png", "size_diversity.png", "fitness_vs_size.png",
                 "README.md"):
        assert (tmp_path / name).is_file(), name


def test_resume_can_extend_but_not_change_the_search(tmp_path):
    start(_config(generations=3), tmp_path)
    search = resume(tmp_path, {"generations": 5})
    assert search.gen == 5
    with pytest.raises(MetricGPError, match="cannot change seed"):
        resume(tmp_path, {"seed": 1})
    with pytest.raises(MetricGPError, match="already holds a run"):
        start(_config(), tmp_path)
    with pytest.raises(MetricGPError, match="no checkpoint.pkl"):
        resume(tmp_path / "missing")


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metricgp.search", "--evaluator", "synthetic", "--space", str(TINY),
            "--generations", "10", "--seed", "3", "--no-progress", "--out", str(run_dir), *extra]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run_dir, "--synthetic-delay", "0.03"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run_dir / "log.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready = (run_dir / "checkpoint.pkl").exists() and log.exists()
            if ready and len(log.read_text().splitlines()) >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run_dir)["search"]["gen"]
    assert 2 <= killed_at < 10
    argv = [sys.executable, "-m", "metricgp.search", "--resume", str(run_dir), "--no-progress"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _outcome(run_dir) == uninterrupted


def test_time_budget_stops_after_the_generation_that_exceeds_it(tmp_path, uninterrupted):
    config = dataclasses.replace(_config(), time_budget_min=1e-6)
    search = start(config, tmp_path)
    assert search.gen == 1 and load_checkpoint(tmp_path)["search"]["gen"] == 1
    assert "time budget of 1e-06 min exceeded" in (tmp_path / "README.md").read_text()
    resume(tmp_path, {"time_budget_min": 60.0})
    assert _outcome(tmp_path) == uninterrupted
