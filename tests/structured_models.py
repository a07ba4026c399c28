"""Tiny models for the structured-pruning tests: the five HF families and one with made-up names."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma3")


def family_model(family: str, vocab: int = 300, seed: int = 0, layers: int = 3) -> nn.Module:
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=16)
        return transformers.Gemma3ForCausalLM(config).eval()
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig", "gemma": "GemmaConfig"}[family]
    extra = {"head_dim": 8} if family == "gemma" else {}
    config = getattr(transformers, cls)(**common, **extra)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


class Mixer(nn.Module):
    """Grouped-query attention whose head counts come from the weight shapes, as in HF models."""

    def __init__(self, hidden: int, heads: int, kv: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.num_key_value_groups = heads // kv
        self.read = nn.Linear(hidden, heads * head_dim, bias=False)
        self.keys = nn.Linear(hidden, kv * head_dim, bias=False)
        self.vals = nn.Linear(hidden, kv * head_dim, bias=False)
        self.write = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.read, self.keys, self.vals))
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.write(y.transpose(1, 2).reshape(b, t, -1))


class Feed(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.w_a = nn.Linear(hidden, width)
        self.w_b = nn.Linear(hidden, width)
        self.w_c = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_c(F.silu(self.w_a(x)) * self.w_b(x))


class Cell(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mix = Mixer(hidden, 4, 2, 8)
        self.ff = Feed(hidden, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(x)
        return x + self.ff(x)


class MadeUpLM(nn.Module):
    """A causal LM with none of the usual module names."""

    def __init__(self, vocab: int = 300, hidden: int = 32, depth: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        self.table = nn.Embedding(vocab, hidden)
        self.cells = nn.ModuleList(Cell(hidden) for _ in range(depth))
        self.unembed = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        x = self.table(input_ids)
        for cell in self.cells:
            x = cell(x)
        return SimpleNamespace(logits=self.unembed(x))
