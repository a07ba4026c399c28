"""Every standard `from_pretrained` argument, as transformers' auto classes forward it, is honoured by a
pruned checkpoint or ignored where it cannot apply; one test per argument (or per group that shares a
reason). New transformers releases forward more arguments with empty values (5.25: `subfolder=""`);
those must not break loading either."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_pruned_io import IDS, PER_LAYER, logits, pruned_model
from torch import nn

import metricgp  # noqa: F401  (registers the pruned model type with the auto classes)
from metricgp.errors import MetricGPError
from metricgp.structured import saving
from metricgp.structured.saving import load_pruned, save_pruned


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """One pruned Llama saved to disk, and its logits on IDS."""
    model = pruned_model("llama")
    path = tmp_path_factory.mktemp("pruned")
    save_pruned(model, path, per_layer=PER_LAYER)
    return path, logits(model, IDS)


def auto_load(path, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def test_subfolder_is_honoured(checkpoint, tmp_path):
    path, expected = checkpoint
    shutil.copytree(path, tmp_path / "sub")
    assert torch.equal(logits(auto_load(tmp_path, subfolder="sub"), IDS), expected)
    with pytest.raises((OSError, ValueError)):  # the parent holds no checkpoint: the subfolder is what was read
        auto_load(tmp_path)


@pytest.mark.parametrize("name,value", [("revision", "v1"), ("cache_dir", "CACHE"), ("local_files_only", True),
                                        ("token", "hf_x"), ("force_download", True)])
def test_hub_arguments_reach_the_download_and_are_inert_for_a_local_dir(checkpoint, tmp_path, monkeypatch,
                                                                        name, value):
    path, expected = checkpoint
    value = str(tmp_path / "cache") if value == "CACHE" else value
    assert torch.equal(logits(saving.MetricGPPrunedForCausalLM.from_pretrained(path, **{name: value}), IDS),
                       expected)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, local_files_only=False, token=None,
                               force_download=False, allow_patterns=None):
        calls.append({"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir,
                      "local_files_only": local_files_only, "token": token, "force_download": force_download})
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = saving.MetricGPPrunedForCausalLM.from_pretrained("someone/pruned-model", config=None, **{name: value})
    assert calls and calls[0]["repo_id"] == "someone/pruned-model" and calls[0][name] == value
    assert torch.equal(logits(model, IDS), expected)


def test_proxies_are_dropped_where_the_hub_client_has_no_such_argument(checkpoint, monkeypatch):
    path, _ = checkpoint
    seen = {}

    def fake_snapshot_download(repo_id, revision=None):
        seen["repo_id"] = repo_id
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    saving.MetricGPPrunedForCausalLM.from_pretrained("someone/pruned", proxies={"https": "http://proxy:1"})
    assert seen == {"repo_id": "someone/pruned"}


@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
def test_dtype_and_its_old_name(checkpoint, name):
    assert auto_load(checkpoint[0], **{name: torch.bfloat16}).dtype == torch.bfloat16
    assert auto_load(checkpoint[0], **{name: "float16"}).dtype == torch.float16


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}])
def test_device_map_on_one_device(checkpoint, device_map):
    model = auto_load(checkpoint[0], device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_device_map_over_several_devices_is_refused(checkpoint):
    with pytest.raises(MetricGPError, match="one device"):
        auto_load(checkpoint[0], device_map={"model": "cpu", "lm_head": "meta"})


def test_attn_implementation(checkpoint):
    assert auto_load(checkpoint[0], attn_implementation="eager").config._attn_implementation == "eager"


def test_variant_reads_that_weights_file(checkpoint, tmp_path):
    path, expected = checkpoint
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors").rename(tmp_path / "model.v2.safetensors")
    assert torch.equal(logits(auto_load(tmp_path, variant="v2"), IDS), expected)
    with pytest.raises(MetricGPError, match="model.safetensors"):
        auto_load(tmp_path)


def test_state_dict_replaces_the_files_weights(checkpoint):
    path, expected = checkpoint
    state = {k: v.clone() for k, v in load_pruned(path).state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] * 2
    doubled = auto_load(path, state_dict=state)
    assert not torch.equal(logits(doubled, IDS), expected)
    assert torch.equal(doubled.lm_head.weight, state["lm_head.weight"])


def test_generation_config(checkpoint):
    from transformers import GenerationConfig

    model = auto_load(checkpoint[0], generation_config=GenerationConfig(max_new_tokens=3))
    assert model.generation_config.max_new_tokens == 3


def test_output_loading_info(checkpoint):
    model, info = auto_load(checkpoint[0], output_loading_info=True)
    assert isinstance(model, nn.Module)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


@pytest.mark.parametrize("name,value", [("trust_remote_code", True), ("low_cpu_mem_usage", True),
                                        ("use_safetensors", True), ("weights_only", True), ("disable_mmap", True),
                                        ("ignore_mismatched_sizes", False), ("adapter_kwargs", {}),
                                        ("adapter_name", "default"), ("tqdm_class", None)])
def test_arguments_that_cannot_apply_are_ignored(checkpoint, name, value):
    path, expected = checkpoint
    assert torch.equal(logits(auto_load(path, **{name: value}), IDS), expected)


def test_a_new_argument_forwarded_empty_is_ignored_and_given_a_value_is_refused_by_name(checkpoint):
    path, expected = checkpoint
    model = saving.MetricGPPrunedForCausalLM.from_pretrained(path, some_future_option="", other_option=None)
    assert torch.equal(logits(model, IDS), expected)
    with pytest.raises(TypeError, match="max_memory"):
        saving.MetricGPPrunedForCausalLM.from_pretrained(path, max_memory={0: "1GiB"})
