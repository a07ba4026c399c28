"""Recovery of structurally pruned models: the library's loop (`metricgp.recover`) plus SAAP's group LoRA.

Model-agnostic, so it works on models whose layers have different widths: the layers to train are found
by `metricgp.models.prunable_layers` (every nn.Linear inside the decoder blocks), never by name. After
`recover` the model has exactly its original modules and classes (adapters merged), is in eval mode, and
every parameter keeps its dtype and `requires_grad` flag. Train windows must come from a calibration
split (`metricgp.recover.training_windows`), never a test split.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from metricgp.models import prunable_layers
from metricgp.recover import RECOVERY_METHODS as LIBRARY_METHODS
from metricgp.recover import RecoveryReport
from metricgp.recover import recover as library_recover
from metricgp.recover.methods import AdapterShape, Masks, Method, Trainable
from metricgp.structured.saap.group import group_adapters, group_lora_params, matched_lora_rank


@contextmanager
def _group_lora(model: nn.Module, layers: dict[str, nn.Linear], shape: AdapterShape,
                masks: Masks | None) -> Iterator[Trainable]:
    """SAAP's group fine-tuning (`metricgp.structured.saap.group`): merged on success, dropped on error."""
    with group_adapters(model, layers, shape.groups, shape.rank, shape.alpha) as params:
        yield Trainable(params)


# every method a structured model can use: the library's, and group LoRA (it does not keep masks)
RECOVERY_METHODS: dict[str, Method] = {**LIBRARY_METHODS,
                                       "group-lora": Method(1e-4, _group_lora, keeps_masks=False,
                                                                     own_dtype=True)}


def recover(model: nn.Module, train_windows: torch.Tensor, *, tokens: int, **options) -> RecoveryReport:
    """`metricgp.recover.recover` with group LoRA among the methods ("group-lora" gives each of `groups`
    groups of a linear's input columns its own rank-`rank` adapter)."""
    return library_recover(model, train_windows, tokens=tokens, methods=RECOVERY_METHODS, **options)


def compare_with_lora(model: nn.Module, train: torch.Tensor, *, tokens: int, groups: int, rank: int = 8,
                      alpha: int = 16, lr: float | None = None, seed: int = 0,
                      val_windows: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """Plain LoRA on a copy of `model`, same token budget and (closest) trainable-parameter count as
    group fine-tuning with `groups` x rank `rank`, same alpha / rank scale. Returns (the recovered
    copy, a report)."""
    layers = prunable_layers(model)
    r = matched_lora_rank(layers, groups, rank)
    twin = copy.deepcopy(model)
    rec = recover(twin, train, method="lora", tokens=tokens, lr=lr, rank=r, alpha=alpha * r / rank,
                  seed=seed, val_windows=val_windows)
    return twin, {"lora_rank": r, "group_lora_trainable_params": group_lora_params(layers, groups, rank),
                  **rec.to_dict()}
