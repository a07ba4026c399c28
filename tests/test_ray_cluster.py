"""The Ray backend on a cluster: it joins the address it is given (or $RAY_ADDRESS), refuses to start
workers that asked for GPUs the cluster does not have, and both searches take the same options."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from metricgp.cli.darwin import build_parser as darwin_parser
from metricgp.cli.search import build_parser as search_parser
from metricgp.errors import MetricGPError
from metricgp.search.backends import RayBackend, make_backend
from metricgp.search.synthetic import SyntheticSpec, build_synthetic

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

FACTORY = functools.partial(build_synthetic, SyntheticSpec(fidelities=(2, 4)))


@pytest.mark.parametrize("parser", [search_parser, darwin_parser], ids=["search", "darwin"])
def test_both_searches_share_the_backend_options(parser):
    args = parser().parse_args(["--backend", "ray", "--workers", "8", "--gpus-per-worker", "1",
                                "--ray-address", "10.0.0.1:6379"])
    assert (args.backend, args.workers, args.gpus_per_worker, args.ray_address) == ("ray", 8, 1.0, "10.0.0.1:6379")


def test_workers_that_ask_for_gpus_the_cluster_lacks_are_an_error_not_a_cpu_run():
    assert not ray.is_initialized()
    with pytest.raises(MetricGPError, match=r"needs 2 GPUs; the Ray cluster has 0"):
        RayBackend(FACTORY, workers=2, gpus_per_worker=1)
    assert not ray.is_initialized()  # the local Ray it started is shut down again


@pytest.mark.parametrize("from_env", [False, True])
def test_an_address_joins_that_cluster(monkeypatch, from_env):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("no cluster there")

    monkeypatch.setattr(ray, "init", fake_init)
    if from_env:
        monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(MetricGPError, match="cannot join the Ray cluster at 10.1.2.3:6379"):
        make_backend("ray", FACTORY, 2, 0.0, None if from_env else "10.1.2.3:6379")
    assert calls == [{"address": "10.1.2.3:6379", "log_to_driver": False}]


def test_without_an_address_a_local_ray_is_started_and_closed(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    backend = make_backend("ray", FACTORY, 2)
    try:
        assert ray.is_initialized() and backend.fidelities() == (2, 4)
    finally:
        backend.close()
    assert not ray.is_initialized()


def test_the_cli_gives_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from metricgp.cli.search import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["--evaluator", "synthetic", "--space", "search_spaces/tiny.yaml", "--backend", "ray",
                 "--workers", "1", "--gpus-per-worker", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "GPUs" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


class WhereEvaluator:
    """Scores every candidate with the id of the process that ran it."""

    fidelities = (1, 4)

    def evaluate(self, candidate, n_windows):
        import os

        from metricgp.evaluate import FitnessResult

        return FitnessResult(float(os.getpid()), n_windows, None, 0.0, 0.5)


def test_a_promoted_candidate_goes_back_to_the_actor_that_scored_its_first_windows(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    tests = str(Path(__file__).resolve().parent)  # the actors import WhereEvaluator from this file
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests}})
    backend = RayBackend(WhereEvaluator, workers=2)
    try:
        first = backend.evaluate([(f"tree{i}", 1) for i in range(6)])
        assert len({r.fitness for r in first}) == 2  # new candidates are spread over both actors
        promoted = backend.evaluate([("tree4", 4), ("tree1", 4), ("tree5", 4)])
    finally:
        backend.close()
        ray.shutdown()
    assert [r.fitness for r in promoted] == [first[4].fitness, first[1].fitness, first[5].fitness]


def test_darwin_on_ray_asks_its_actors_for_the_gpus_given(tiny_llama_dir, text_files, isolated_cache, tmp_path, capsys):
    """A cluster that advertises two GPUs but has none (Ray takes `num_gpus` on trust): the level search's
    actor is scheduled only because it asked for one, then finds no CUDA device: a one-line error, exit 2."""
    from metricgp.darwin.__main__ import main

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "run"
        code = main(["--model", str(tiny_llama_dir), "--calib", str(text_files["calib"]), "--n-calib", "4",
                     "--seqlen", "32", "--metric", "wanda", "--keep", "0.7", "--fitness-data", str(text_files["calib"]),
                     "--no-progress", "--backend", "ray", "--workers", "1", "--gpus-per-worker", "1",
                     "--out", str(out)])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "asked for 1 GPU but sees none" in errors[0], err[-2000:]
    assert "Traceback" not in err and not out.exists()
