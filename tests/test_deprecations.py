"""metricgp's own calls into transformers, torch and peft use no deprecated API.

pyproject's pytest `filterwarnings` turns every FutureWarning and DeprecationWarning of the suite into
an error; these tests check the paths that tripped on newer releases once more with the filter set here,
so they hold when the suite is run with other options (`-W default`, `-p no:warnings`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model

from metricgp.structured.recover import recover
from metricgp.structured.saving import save_pruned
from metricgp.structured.speed import decode_op_profile

DEPRECATIONS = (FutureWarning, DeprecationWarning)


@pytest.fixture
def deprecations_are_errors():
    with warnings.catch_warnings():
        for category in DEPRECATIONS:
            warnings.simplefilter("error", category)
        yield


def test_the_filter_catches_a_deprecation(deprecations_are_errors):
    """The fixture really turns the warnings transformers raises into errors."""
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("old", new_name="new", version="999.0")
    def f(new=None):
        return new

    with pytest.raises(FutureWarning):
        f(old=1)


def test_decode_loop_passes_the_cache_by_its_current_name(deprecations_are_errors):
    profile = decode_op_profile(tiny_model("llama").eval(), prompt_len=8, steps=2)
    assert profile["steps"] == 2 and profile["ms_per_step"] > 0


def test_lora_recovery_uses_no_deprecated_peft_or_transformers_api(deprecations_are_errors):
    model = tiny_model("llama")
    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    recover(model, windows, tokens=2 * 16, lr=1e-2, progress=False)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # merged into the weights
    assert not any("lora" in name for name, _ in model.named_modules())


def test_auto_class_reload_forwards_nothing_deprecated(deprecations_are_errors, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama").eval()
    save_pruned(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
