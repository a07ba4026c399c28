"""The level search on Ray actors (each loads its own model) gives exactly the serial results."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture()
def tiny4(tmp_path, tiny_llama_dir):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_ray_backend_equals_serial(tiny4, text_files, isolated_cache, tmp_path):
    """The same run (with in-loop training at the first stage) on two actors and in this process."""
    from test_darwin_model import make_config

    from metricgp.darwin.run import start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor (one CPU each)
    stages = ({"survivors": 2, "windows": 1, "train_tokens": 32}, {"survivors": 1, "windows": 2, "train_tokens": 0})
    config = make_config(tiny4, text_files, stages=stages, generations=2, save_model=False, dense_eval=False)
    try:
        start(config, tmp_path / "serial")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"METRICGP_CACHE": str(isolated_cache)}})
        start(dataclasses.replace(config, backend="ray", workers=2), tmp_path / "ray")
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
    log = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                     for x in (d / "log.jsonl").read_text().splitlines()]
    assert log(tmp_path / "ray") == log(tmp_path / "serial") and len(log(tmp_path / "ray")) == 3
    assert all(r["evaluations_per_stage"][0] > 0 for r in log(tmp_path / "ray")[1:])
