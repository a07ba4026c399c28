"""Recovery fine-tuning of a causal LM for a token budget: LoRA or group LoRA (merged back), or full.

Model-agnostic, so it works on structurally pruned models whose layers have different widths:
the layers to train are found by `metricgp.models.prunable_layers` (every nn.Linear inside the
decoder blocks), never by name. After `recover` the model has exactly its original modules and
classes (LoRA adapters are merged with `merge_and_unload`), is in eval mode, and every parameter
keeps its dtype and `requires_grad` flag.

Training runs in float32: parameters of another dtype are cast to float32 for the run and cast
back afterwards (buffers are left alone). Train windows must come from a calibration split
(`metricgp.data.windows(ref, tok, "calibration", ...)`), never a test split.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from metricgp.errors import MetricGPError
from metricgp.measure import perplexity
from metricgp.models import find_blocks, prunable_layers
from metricgp.structured.saap.group import group_adapters, group_lora_params, matched_lora_rank

MAX_GRAD_NORM = 1.0  # gradient clipping, so a too-large lr degrades rather than explodes


@dataclass
class RecoveryReport:
    method: str
    tokens: int  # tokens actually trained on: steps * batch_size * seqlen
    steps: int
    seconds: float
    trainable_params: int
    lr: float
    losses: list[float] = field(default_factory=list)  # training loss of every step
    val_ppl_before: float | None = None
    val_ppl_after: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RecoveryConfig:
    method: str
    tokens: int
    lr: float
    batch_size: int
    rank: int
    alpha: int
    target: tuple[str, ...] | None  # substrings of full module names; None: every block linear
    seed: int
    groups: int = 1  # group-lora: input-column groups per linear, each with its own adapter


Trainable = tuple[nn.Module, list[nn.Parameter]]  # the module to call, the parameters to step


@contextmanager
def _lora(model: nn.Module, layers: dict[str, nn.Linear], config: RecoveryConfig) -> Iterator[Trainable]:
    """Adapters on `layers`; merged into the weights on success, discarded on error."""
    from peft import LoraConfig, LoraModel

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=list(layers))
    # The tuner itself, not `get_peft_model`'s PeftModel wrapper: we need only inject, train, merge, and the
    # wrapper reads transformers' deprecated `is_gradient_checkpointing` (peft 0.21).
    peft_model = LoraModel(model, lora, "default")
    try:
        yield peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    except BaseException:
        peft_model.unload()
        raise
    peft_model.merge_and_unload()


@contextmanager
def _full(model: nn.Module, layers: dict[str, nn.Linear], config: RecoveryConfig) -> Iterator[Trainable]:
    """Every parameter of the decoder blocks (or, with a target, of the targeted linears)."""
    owners = [find_blocks(model)[1]] if config.target is None else list(layers.values())
    params = list({id(p): p for owner in owners for p in owner.parameters()}.values())
    for p in params:
        p.requires_grad_(True)
    yield model, params


@contextmanager
def _group_lora(model: nn.Module, layers: dict[str, nn.Linear], config: RecoveryConfig) -> Iterator[Trainable]:
    """SAAP's group fine-tuning (`metricgp.structured.saap.group`): merged on success, dropped on error."""
    with group_adapters(model, layers, config.groups, config.rank, config.alpha) as params:
        yield model, params


@dataclass(frozen=True)
class Method:
    default_lr: float
    attach: Callable[[nn.Module, dict[str, nn.Linear], RecoveryConfig], AbstractContextManager[Trainable]]


RECOVERY_METHODS: dict[str, Method] = {"lora": Method(1e-4, _lora), "group-lora": Method(1e-4, _group_lora),
                                       "full": Method(1e-5, _full)}


def recover(
    model: nn.Module,
    train_windows: torch.Tensor,
    *,
    method: str = "lora",
    tokens: int,
    lr: float | None = None,
    batch_size: int = 1,
    rank: int = 8,
    alpha: int = 16,
    target: str | list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    val_windows: torch.Tensor | None = None,
    groups: int = 4,
) -> RecoveryReport:
    """Fine-tune `model` in place on `train_windows` (n, seqlen) for about `tokens` tokens.

    Steps = tokens // (batch_size * seqlen), at least 1; windows are visited in seeded random
    order and cycled when the budget exceeds them. AdamW (no weight decay), gradients clipped
    to MAX_GRAD_NORM. Default lr: 1e-4 for "lora", 1e-5 for "full". `target` restricts training
    to block linears whose full name contains one of the given substrings (e.g. "mlp"); "full"
    without a target trains every block parameter, norms included. With `val_windows`, the
    report holds the perplexity on them before and after. "group-lora" gives each of `groups` groups
    of a linear's input columns its own rank-`rank` adapter.
    """
    config = _config(train_windows, method, tokens, lr, batch_size, rank, alpha, target, seed, groups)
    seqlen = train_windows.shape[1]
    steps = max(1, tokens // (batch_size * seqlen))
    before = _val_ppl(model, val_windows)
    t0 = time.perf_counter()
    with torch.random.fork_rng(), _training_state(model):
        torch.manual_seed(seed)
        layers = _select(model, config.target)
        with RECOVERY_METHODS[method].attach(model, layers, config) as (module, params):
            trained = sum(p.numel() for p in params)
            batches = _batches(len(train_windows), batch_size, steps, seed)
            losses = _train(module, params, train_windows, batches, config.lr, progress)
    report = RecoveryReport(method, steps * batch_size * seqlen, steps, time.perf_counter() - t0, trained,
                            config.lr, losses)
    report.val_ppl_before, report.val_ppl_after = before, _val_ppl(model, val_windows)
    return report


def _config(windows: torch.Tensor, method: str, tokens: int, lr: float | None, batch_size: int, rank: int,
            alpha: int, target: str | list[str] | None, seed: int, groups: int = 1) -> RecoveryConfig:
    if method not in RECOVERY_METHODS:
        raise MetricGPError(f"unknown recovery method '{method}' (choose from {', '.join(RECOVERY_METHODS)})")
    if tokens < 1:
        raise MetricGPError(f"recovery tokens must be at least 1, got {tokens}")
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise MetricGPError(f"recovery needs (n, seqlen >= 2) train windows, got shape {tuple(windows.shape)}")
    if batch_size < 1 or rank < 1 or groups < 1:
        raise MetricGPError(f"batch_size, rank and groups must be at least 1, got {batch_size}, {rank} and {groups}")
    lr = RECOVERY_METHODS[method].default_lr if lr is None else lr
    if not lr >= 0:
        raise MetricGPError(f"learning rate must be >= 0, got {lr}")
    targets = None if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return RecoveryConfig(method, tokens, lr, batch_size, rank, alpha, targets, seed, groups)


def _select(model: nn.Module, target: tuple[str, ...] | None) -> dict[str, nn.Linear]:
    layers = prunable_layers(model)
    chosen = {n: m for n, m in layers.items() if target is None or any(t in n for t in target)}
    if not chosen:
        raise MetricGPError(f"recovery target {list(target or ())} matches no linear layer in the decoder blocks")
    return chosen


@contextmanager
def _training_state(model: nn.Module) -> Iterator[None]:
    """Freeze everything in float32; afterwards restore dtypes and flags, and leave eval mode on."""
    saved = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        if p.is_floating_point():
            p.data = p.data.float()
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            dtype, flag = saved.get(n, (p.dtype, False))  # unknown names: adapters left by a failure
            p.data = p.data.to(dtype)
            p.grad = None
            p.requires_grad_(flag)
        model.eval()


def _batches(n_windows: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Window indices per step: seeded permutations, concatenated as often as the budget needs."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    order = torch.cat([torch.randperm(n_windows, generator=gen) for _ in range(math.ceil(need / n_windows))])
    return list(order[:need].view(steps, batch_size))


def _train(module: nn.Module, params: list[nn.Parameter], windows: torch.Tensor, batches: list[torch.Tensor],
           lr: float, progress: bool) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device
    module.train()
    losses = []
    for idx in tqdm(batches, desc="recover", unit="step", disable=not progress):
        ids = windows[idx].to(device)
        loss = module(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        losses.append(loss.item())
    return losses


def _val_ppl(model: nn.Module, windows: torch.Tensor | None) -> float | None:
    return None if windows is None else perplexity(model, windows)


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
