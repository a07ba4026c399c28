"""What recovery trains, and how the result goes back into the model's own weights.

A method attaches to the model and yields a `Trainable` (the parameters to step and what to do after
every optimizer step); on success the result is in the model's weights (adapters merged), on error it
is dropped. `RECOVERY_METHODS` holds "lora" (rank-r adapters on the block linears) and "full" (every
block parameter); `metricgp.structured.recover` adds "group-lora" on top.

Masks keep a sparse model sparse (`sparse_masks`: weight != 0 of every prunable linear, captured right
after pruning):
- "full" multiplies each masked weight's gradient by its mask and re-masks the weight after every step
  (AdamW's weight decay and momentum would otherwise refill the zeros);
- "lora" trains adapters whose update is masked in the forward pass as in the merge,
  y = (W + (alpha/r) (B A) * M) x, so the model that is trained is the model that is merged (an adapter
  trained unmasked and masked only at the merge would lose about the pruned fraction of its update).
  (B A) * M is not low-rank, so a masked adapter costs about what full fine-tuning costs per step; its
  backward recomputes the masked weight instead of keeping one per layer alive (no second copy of the
  model's weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.models import find_blocks, prunable_layers

Masks = dict[str, torch.Tensor]  # prunable linear name -> bool tensor of its weight's shape (True: kept)


def _nothing() -> None:
    return None


@dataclass
class Trainable:
    params: list[nn.Parameter]
    after_step: Callable[[], None] = field(default=_nothing)  # e.g. re-apply the masks


@dataclass(frozen=True)
class AdapterShape:
    """What an attach needs of the run's configuration."""

    rank: int
    alpha: float
    groups: int
    target: tuple[str, ...] | None  # None: every block parameter ("full")


Attach = Callable[[nn.Module, dict[str, nn.Linear], AdapterShape, Masks | None], AbstractContextManager[Trainable]]


@dataclass(frozen=True)
class Method:
    default_lr: float
    attach: Attach
    keeps_masks: bool = True  # whether `attach` honours masks (else recovery with masks is refused)
    # whether its adapters train in float32 beside frozen weights of their own dtype (no float32 copy of a
    # bfloat16 model; without masks), else every parameter is cast to float32 for the run
    own_dtype: bool = False


def sparse_masks(model: nn.Module) -> Masks:
    """weight != 0 of every prunable linear: the sparsity pattern to keep (call right after pruning)."""
    return {name: layer.weight.detach() != 0 for name, layer in prunable_layers(model).items()}


def check_masks(model: nn.Module, masks: Masks) -> None:
    layers = prunable_layers(model)
    for name, mask in masks.items():
        if name not in layers or mask.shape != layers[name].weight.shape or mask.dtype != torch.bool:
            raise MetricGPError(f"mask '{name}' does not match a prunable linear of the model (a bool tensor of "
                                "its weight's shape)")


@contextmanager
def _peft_lora(model: nn.Module, layers: dict[str, nn.Linear], shape: AdapterShape) -> Iterator[Trainable]:
    from peft import LoraConfig, LoraModel

    lora = LoraConfig(r=shape.rank, lora_alpha=shape.alpha, lora_dropout=0.0, target_modules=list(layers))
    # The tuner itself, not `get_peft_model`'s PeftModel wrapper: we need only inject, train, merge, and the
    # wrapper reads transformers' deprecated `is_gradient_checkpointing` (peft 0.21).
    peft_model = LoraModel(model, lora, "default")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:  # adapters in float32 beside bfloat16/float16 weights (the tuner alone makes them in W's dtype)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    try:
        yield Trainable(params)
    except BaseException:
        peft_model.unload()
        raise
    peft_model.merge_and_unload()


class _MaskedDelta(torch.autograd.Function):
    """y = x (W + s (B A) * M)^T + b, with gradients for A and B only; the backward recomputes the
    masked weight rather than saving one (out x in) tensor per layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, mask, scale):
        ctx.save_for_backward(x, weight, a, b, mask)
        ctx.scale = scale
        return F.linear(x, weight + (b @ a).mul_(scale).mul_(mask), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, mask = ctx.saved_tensors
        grad_x = grad @ (weight + (b @ a).mul_(ctx.scale).mul_(mask)) if ctx.needs_input_grad[0] else None
        grad_delta = (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])).mul_(mask).mul_(ctx.scale)
        return grad_x, None, None, b.T @ grad_delta, grad_delta @ a.T, None, None


class MaskedLoRALinear(nn.Module):
    """`base` plus a rank-r adapter whose update (alpha/r) B A is multiplied by `mask` (True: kept)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, mask: torch.Tensor):
        super().__init__()
        w = base.weight
        self.base = base
        self.scale = alpha / rank
        self.register_buffer("mask", mask.to(w.device), persistent=False)  # bool: 1 byte per weight
        self.A = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as LoRA: A random, B zero, so training starts at W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskedDelta.apply(x, self.base.weight, self.base.bias, self.A, self.B, self.mask, self.scale)

    def delta(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale * self.mask


@contextmanager
def swapped_adapters(model: nn.Module, wrapped: dict[str, nn.Module]) -> Iterator[None]:
    """Put each wrapper (a module with `.base`, the linear it wraps, and `.delta()`, its weight update) in
    place of its linear; on success add each delta to its linear's weight, on error drop it; either way
    put the original linears back (the saved model has no adapter modules)."""
    for name, w in wrapped.items():
        model.set_submodule(name, w)
    ok = False
    try:
        yield
        ok = True
    finally:
        with torch.no_grad():
            for name, w in wrapped.items():
                if ok:
                    w.base.weight += w.delta().to(w.base.weight.dtype)
                model.set_submodule(name, w.base)


@contextmanager
def _masked_lora(model: nn.Module, layers: dict[str, nn.Linear], shape: AdapterShape,
                 masks: Masks) -> Iterator[Trainable]:
    """Masked adapters in place of `layers`, merged on success (zeros stay zero)."""
    wrapped = {name: MaskedLoRALinear(lin, shape.rank, shape.alpha,
                                      masks.get(name, torch.ones_like(lin.weight, dtype=torch.bool)))
               for name, lin in layers.items()}
    with swapped_adapters(model, wrapped):
        yield Trainable([p for w in wrapped.values() for p in (w.A, w.B)])


@contextmanager
def _lora(model: nn.Module, layers: dict[str, nn.Linear], shape: AdapterShape,
          masks: Masks | None) -> Iterator[Trainable]:
    """peft's LoRA (merged with `merge_and_unload`), or with masks the masked adapters above."""
    context = _peft_lora(model, layers, shape) if masks is None else _masked_lora(model, layers, shape, masks)
    with context as trainable:
        yield trainable


@contextmanager
def _full(model: nn.Module, layers: dict[str, nn.Linear], shape: AdapterShape,
          masks: Masks | None) -> Iterator[Trainable]:
    """Every parameter of the decoder blocks (or, with a target, of the targeted linears); masked
    weights get masked gradients and are re-masked after every step."""
    owners = [find_blocks(model)[1]] if shape.target is None else list(layers.values())
    params = list({id(p): p for owner in owners for p in owner.parameters()}.values())
    for p in params:
        p.requires_grad_(True)
    trained = {id(p) for p in params}
    linears = prunable_layers(model)
    masked = [(linears[n].weight, m.to(linears[n].weight.device)) for n, m in (masks or {}).items()
              if id(linears[n].weight) in trained]
    handles = [w.register_hook(lambda g, m=m: g * m) for w, m in masked]

    def remask() -> None:
        with torch.no_grad():
            for w, m in masked:
                w.mul_(m)

    try:
        yield Trainable(params, remask)
    finally:
        for h in handles:
            h.remove()


RECOVERY_METHODS: dict[str, Method] = {"lora": Method(1e-4, _lora, own_dtype=True), "full": Method(1e-5, _full)}
