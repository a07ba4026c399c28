"""Generic layer discovery across architecture families, and model-name errors."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.models import find_blocks, prunable_layers, resolve_model_path

PROJECTIONS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_discovers_every_decoder_linear_and_nothing_else(family):
    model = tiny_model(family)
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    layers = prunable_layers(model)
    assert len(layers) == 2 * len(PROJECTIONS)
    assert {name.split(".", 3)[3] for name in layers} == PROJECTIONS
    assert all(isinstance(m, nn.Linear) for m in layers.values())
    assert not any("lm_head" in n or "embed" in n for n in layers)
    # forward (block) order: block 0 comes entirely before block 1
    assert [n.split(".")[2] for n in layers] == ["0"] * 7 + ["1"] * 7


def test_discovery_is_not_tied_to_names():
    """A model whose blocks are called something else entirely is found the same way."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)
            self.ff = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.heads = nn.ModuleList([nn.Linear(4, 4)])
            self.stack = nn.ModuleList([Block() for _ in range(3)])
            self.out = nn.Linear(4, 10)

    layers = prunable_layers(Net())
    assert list(layers)[:3] == ["stack.0.mix", "stack.0.ff.0", "stack.0.ff.2"] and len(layers) == 9


def test_model_without_blocks_is_a_clear_error():
    with pytest.raises(MetricGPError, match="no decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_missing_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(MetricGPError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(MetricGPError, match="not found"):
        resolve_model_path(str(tmp_path / "model.gguf"))
    with pytest.raises(MetricGPError, match="config.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
