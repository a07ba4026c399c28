"""SAAP's group fine-tuning: low-rank adapters per group of input columns, merged back.

Each adapted linear W (out x in) has its input features split into `groups` contiguous groups
(sizes differ by at most one, so pruned widths need not divide); group g gets its own rank-r pair
A_g (r x in_g), B_g (out x r), and

    y = W x + (alpha / r) sum_g B_g A_g x[cols_g]       i.e.  dW = (alpha / r) [B_1 A_1 | ... | B_G A_G]

A_g starts Kaiming-uniform and B_g at zero (as LoRA), so training starts from the pruned model.
Like QA-LoRA the adapters act per input group; unlike QA-LoRA the group input is not pooled, so dW
has rank up to G r instead of G. Trainable parameters: r (in + G out) per linear, against r' (in +
out) for plain LoRA; `matched_lora_rank` gives the r' with the same total, for a like-for-like
comparison (`recover.compare_with_lora`). After training dW is added to W and the original nn.Linear put
back: the saved model has no adapter modules.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from metricgp.recover.methods import swapped_adapters


class GroupLoRALinear(nn.Module):
    """`base` plus one low-rank adapter per group of input columns."""

    def __init__(self, base: nn.Linear, groups: int, rank: int, alpha: float):
        super().__init__()
        self.base = base
        w = base.weight
        self.bounds = [(int(c[0]), int(c[-1]) + 1) for c in torch.arange(w.shape[1]).tensor_split(groups) if len(c)]
        self.scale = alpha / rank
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype  # adapters in float32
        self.A = nn.ParameterList(nn.Parameter(torch.empty(rank, hi - lo, dtype=dtype, device=w.device))
                                  for lo, hi in self.bounds)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(w.shape[0], rank, dtype=dtype, device=w.device))
                                  for _ in self.bounds)
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for (lo, hi), a, b in zip(self.bounds, self.A, self.B, strict=True):
            y = y + (self.scale * ((x[..., lo:hi].to(a.dtype) @ a.T) @ b.T)).to(y.dtype)
        return y

    def delta(self) -> torch.Tensor:
        """dW (out x in)."""
        return self.scale * torch.cat([b @ a for a, b in zip(self.A, self.B, strict=True)], dim=1)


@contextmanager
def group_adapters(model: nn.Module, layers: dict[str, nn.Linear], groups: int, rank: int,
                   alpha: float) -> Iterator[list[nn.Parameter]]:
    """Wrap `layers` in group adapters and yield their parameters; on success dW is merged into each
    weight, on error it is dropped. Either way the original linears are put back."""
    wrapped = {name: GroupLoRALinear(lin, min(groups, lin.in_features), rank, alpha) for name, lin in layers.items()}
    with swapped_adapters(model, wrapped):
        yield [p for w in wrapped.values() for p in (*w.A, *w.B)]


def group_lora_params(layers: dict[str, nn.Linear], groups: int, rank: int) -> int:
    return sum(rank * (m.in_features + min(groups, m.in_features) * m.out_features) for m in layers.values())


def matched_lora_rank(layers: dict[str, nn.Linear], groups: int, rank: int) -> int:
    """The plain-LoRA rank whose trainable-parameter count is closest to group fine-tuning's."""
    per_rank = sum(m.in_features + m.out_features for m in layers.values())
    return max(1, round(group_lora_params(layers, groups, rank) / per_rank))
