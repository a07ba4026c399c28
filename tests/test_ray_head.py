"""A real Ray cluster on this machine (`ray start --head`), joined with `--ray-address`: the metric
search and the level search give the serial backend's results, in the synchronous mode."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

RAY = Path(sys.executable).with_name("ray")
TIMING = ("seconds", "eval_seconds", "worker_idle_share")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def head(tmp_path, monkeypatch):
    """`ray start --head --block` with 2 CPUs; its workers see this test's cache. Stopped by signal (not
    `ray stop`, which would stop every Ray on the machine)."""
    port = _free_port()
    cache = tmp_path / "cache"
    monkeypatch.setenv("METRICGP_CACHE", str(cache))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = {**os.environ, "METRICGP_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("ray start --head did not open its port")
    had_mode = "RAY_AUTH_MODE" in os.environ
    yield f"127.0.0.1:{port}"
    if not had_mode:  # joining may have switched this process to token mode
        os.environ.pop("RAY_AUTH_MODE", None)
    if ray.is_initialized():
        ray.shutdown()
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    # `ray start` records its cluster as the machine's current one, and a later `ray.init()` would try to
    # join that dead address: forget it, as `ray stop` does
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def _log(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run_dir / "log.jsonl").read_text().splitlines()]


def test_search_and_darwin_joined_to_a_ray_head_equal_serial(head, tmp_path, tiny_llama_dir, text_files):
    import torch
    from test_darwin_model import make_config
    from test_search_resume import _config

    from metricgp.darwin.run import start as darwin_start
    from metricgp.search.run import start as search_start

    config = _config(generations=4)
    search_start(config, tmp_path / "serial")
    search_start(dataclasses.replace(config, backend="ray", workers=2, ray_address=head), tmp_path / "ray")
    assert _log(tmp_path / "ray") == _log(tmp_path / "serial") and len(_log(tmp_path / "ray")) == 5
    assert not ray.is_initialized()  # the backend left the cluster it joined

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor (one CPU each)
    try:
        darwin = make_config(tiny_llama_dir, text_files, generations=2, save_model=False, dense_eval=False)
        darwin_start(darwin, tmp_path / "darwin-serial")
        darwin_start(dataclasses.replace(darwin, backend="ray", workers=2, ray_address=head), tmp_path / "darwin-ray")
    finally:
        torch.set_num_threads(threads)
    assert _log(tmp_path / "darwin-ray") == _log(tmp_path / "darwin-serial")
    assert len(_log(tmp_path / "darwin-ray")) == 3
