"""The Ray backend (one evaluator per actor) gives exactly the serial backend's results."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from metricgp.expr import parse
from metricgp.search.backends import RayBackend, SerialBackend
from metricgp.search.gp import GPSearch
from metricgp.search.space import load_space, with_overrides
from metricgp.search.synthetic import SyntheticSpec, build_synthetic

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

FIDS = (2, 4, 8)
TINY = Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _run(backend, dispatch: str = "sync", ignore: tuple[str, ...] = ()) -> tuple[list, list]:
    space = with_overrides(load_space(TINY), gp={"seed": 5, "generations": 4})
    search = GPSearch(space, backend, backend.fidelities(), dispatch=dispatch, lag=4)
    records = [search.initialize()] + [search.step() for _ in range(4)]
    timing = ("seconds", "eval_seconds", "worker_idle_share", *ignore)
    strip = [{k: v for k, v in r.items() if k not in timing} for r in records]
    return strip, [(str(i.node), i.fitness.values) for i in search.hof]


def test_ray_backend_equals_serial(local_ray):
    factory = functools.partial(build_synthetic, SyntheticSpec(fidelities=FIDS))
    serial = SerialBackend(factory)
    remote = RayBackend(factory, workers=2)
    try:
        assert remote.fidelities() == serial.fidelities() == FIDS
        jobs = [(parse(t), n) for t in ("abs(W)", "mul(abs(W), sqrt(X))", "G", "sub(W, W)") for n in FIDS]
        assert _same(remote.evaluate(jobs), serial.evaluate(jobs))
        ray_sync = _run(remote)
        assert ray_sync == _run(serial)
        # the windows the actors ran equal the serial evaluator's: a promoted candidate ran only its new windows
        assert all(r["windows_run"] > 0 for r in ray_sync[0])
        # (the actors' evaluators remember the windows of the sync run: windows_run differs)
        assert _run(remote, "async", ("windows_run",)) == _run(SerialBackend(factory), "async", ("windows_run",))
    finally:
        remote.close()
    assert ray.is_initialized()  # the backend leaves a Ray instance it did not start running


def _same(a, b) -> bool:  # equal up to the timing field
    return [(r.fitness, r.n_windows, r.reason, r.sparsity) for r in a] == \
           [(r.fitness, r.n_windows, r.reason, r.sparsity) for r in b]
