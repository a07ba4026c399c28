"""The search on a real (tiny) language model: resume equality, Ray = serial, and apply of its best."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from metricgp.evaluate import EvaluatorSpec, build_evaluator
from metricgp.expr import parse
from metricgp.search.backends import SerialBackend
from metricgp.search.run import RunConfig, resume, start
from metricgp.search.space import load_space, with_overrides

TINY = Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml"
TIMING = ("seconds", "eval_seconds", "worker_idle_share", "windows_run")  # windows_run: caches die with a process


@pytest.fixture(scope="module")
def spec(tiny_llama_dir, text_files) -> dict:
    return {"model": str(tiny_llama_dir), "calib": str(text_files["calib"]), "valid": str(text_files["valid"]),
            "n_calib": 4, "seqlen": 32, "fidelities": (1, 2)}


def _config(spec: dict, generations: int = 3) -> RunConfig:
    space = with_overrides(load_space(TINY), gp={"generations": generations, "seed": 1, "population": 6,
                                                 "offspring": 3})
    return RunConfig(space=space, evaluator="model", evaluator_spec=spec, name="m")


def _outcome(run_dir: Path):
    hof = json.loads((run_dir / "hall_of_fame.json").read_text())["entries"]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return hof, [{k: v for k, v in r.items() if k not in TIMING} for r in log]


def test_model_search_resumes_exactly_and_its_best_applies(tmp_path, spec, isolated_cache, text_files):
    full, part = tmp_path / "full", tmp_path / "part"
    start(_config(spec), full)
    start(_config(spec), part, stop_after=1)
    assert len(_outcome(part)[1]) == 2  # initial population + one generation
    resume(part)
    assert _outcome(part) == _outcome(full)
    hof = _outcome(full)[0]
    assert hof[0]["fitness"] is not None and hof[0]["fidelity"] == 2

    from metricgp.cli.apply import main as apply_main

    out = tmp_path / "applied"
    assert apply_main(["--metric-file", str(full / "best.json"), "--model", spec["model"], "--calib", spec["calib"],
                       "--n-calib", "4", "--seqlen", "32", "--dataset", str(text_files["test"]),
                       "--eval-windows", "2", "--out", str(out), "--no-save-model"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"]["functional"] == json.loads((full / "best.json").read_text())["formula"]


def test_a_search_on_an_offloaded_model_finds_what_the_resident_one_finds(tmp_path, spec, isolated_cache):
    resident, offloaded = tmp_path / "resident", tmp_path / "offloaded"
    start(_config(spec, generations=2), resident)
    start(_config({**spec, "offload": True}, generations=2), offloaded)
    assert _outcome(offloaded) == _outcome(resident)


def test_ray_backend_equals_serial_on_a_model(spec, isolated_cache):
    ray = pytest.importorskip("ray")
    from metricgp.search.backends import RayBackend

    factory = functools.partial(build_evaluator, EvaluatorSpec(**spec))
    jobs = [(parse(t), n) for t in ("abs(W)", "mul(abs(W), sqrt(X))", "mul(abs(mul(W, W)), mms(G))", "sub(W, W)")
            for n in (1, 2)]
    serial = SerialBackend(factory).evaluate(jobs)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"METRICGP_CACHE": str(isolated_cache)}})
    try:
        remote = RayBackend(factory, workers=2)
        got = remote.evaluate(jobs)
        remote.close()
    finally:
        ray.shutdown()
    key = [(r.fitness, r.n_windows, r.reason, r.sparsity) for r in serial]
    assert [(r.fitness, r.n_windows, r.reason, r.sparsity) for r in got] == key
    assert all(r.fitness < float("inf") for r in serial[:6]) and serial[-1].fitness == float("inf")


def test_with_ray_the_driver_computes_the_statistics_once_before_any_worker(spec, isolated_cache, monkeypatch):
    ray = pytest.importorskip("ray")
    import dataclasses

    from metricgp.search import run

    config = dataclasses.replace(_config(spec), backend="ray", workers=2)
    order = []
    real_warm, real_make = run.warm_caches, run.make_backend
    monkeypatch.setattr(run, "warm_caches", lambda c: order.append("warm") or real_warm(c))
    monkeypatch.setattr(run, "make_backend", lambda *a: order.append("workers") or real_make(*a))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"METRICGP_CACHE": str(isolated_cache)}})
    try:
        real_warm(config)  # what the driver leaves in the cache
        files = sorted(isolated_cache.rglob("*.safetensors"))
        stamps = [f.stat().st_mtime_ns for f in files]
        backend = run._backend(config)
        try:
            assert backend.fidelities() == (1, 2)
        finally:
            backend.close()
    finally:
        ray.shutdown()
    assert order == ["warm", "workers"]
    assert files and sorted(isolated_cache.rglob("*.safetensors")) == files  # the workers wrote no statistics
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_the_kl_reference_is_computed_once_and_read_back_by_later_evaluators(spec, isolated_cache, monkeypatch):
    """The driver's evaluator caches the dense top-k reference; an evaluator built afterwards (a worker)
    reads it instead of running the dense model again, and scores exactly alike."""
    import dataclasses

    import torch

    from metricgp.evaluate import FITNESSES

    kl = EvaluatorSpec(**spec, fitness="kl")
    first = build_evaluator(kl)
    assert len(list((isolated_cache / "references").glob("*.safetensors"))) == 1

    def no_dense_pass(*_args, **_kwargs):
        raise AssertionError("the reference was computed again")

    monkeypatch.setitem(FITNESSES, "kl", dataclasses.replace(FITNESSES["kl"], reference=no_dense_pass))
    second = build_evaluator(kl)
    tree = parse("mul(abs(W), sqrt(X))")
    assert second.evaluate(tree, 2).fitness == first.evaluate(tree, 2).fitness
    assert torch.equal(second.reference.top_idx, first.reference.top_idx)
