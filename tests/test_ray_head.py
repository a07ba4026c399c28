"""A real Ray cluster on this machine (`ray start --head`), joined with `--ray-address`: the metric
search and the level search give the serial backend's results, in the synchronous mode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

TIMING = ("seconds", "eval_seconds", "worker_idle_share")


@pytest.fixture()
def head(tmp_path, monkeypatch):
    """`ray start --head` with 2 CPUs (as `make bench-distributed` starts it); its workers see this test's cache."""
    from metricgp.experiments.distributed import local_head

    cache = tmp_path / "cache"
    monkeypatch.setenv("METRICGP_CACHE", str(cache))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with local_head(num_cpus=2, env={"METRICGP_CACHE": str(cache)}) as address:
        yield address
        if ray.is_initialized():
            ray.shutdown()


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
    asynchronous = dataclasses.replace(config, dispatch="async", lag=4)
    search_start(asynchronous, tmp_path / "serial-async")
    search_start(dataclasses.replace(asynchronous, backend="ray", workers=2, ray_address=head), tmp_path / "ray-async")
    # equal, windows run included: a promoted candidate waited for the actor that kept its window losses
    assert _log(tmp_path / "ray-async") == _log(tmp_path / "serial-async") != _log(tmp_path / "serial")

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
