"""Physical shrinking: linear layers replaced by smaller ones, head counts updated, blocks removed.

One mechanism for every architecture: a module's coupled `Slice`s say which rows/columns of which
linear belong to which element, so shrinking is "keep these elements" applied to each slice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.models import find_blocks
from metricgp.structured.groups import Module, Slice
from metricgp.structured.importance import Unit, by_module

# int attributes an attention module may carry that count heads; updated when they exist
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear with only the given output rows / input columns (and their bias entries)."""
    w = lin.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    bias = lin.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            b = bias.detach()
            new.bias.copy_(b.index_select(0, rows.to(b.device)) if rows is not None else b)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def _expand(kept: list[int], size: int) -> torch.Tensor:
    return torch.tensor([k * size + j for k in kept for j in range(size)], dtype=torch.long)


def _slice_all(model: nn.Module, slices: Iterable[Slice], kept: list[int]) -> None:
    for s in slices:
        lin = model.get_submodule(s.linear)
        idx = _expand(kept, s.size)
        new = slice_linear(lin, rows=idx) if s.axis == 0 else slice_linear(lin, cols=idx)
        parent, _, attr = s.linear.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def _set_counts(attn: nn.Module, n_q: int, n_kv: int) -> None:
    if isinstance(getattr(attn, "num_key_value_groups", None), int):
        attn.num_key_value_groups = n_q // n_kv
    for names, value in ((_HEAD_COUNT_ATTRS, n_q), (_KV_COUNT_ATTRS, n_kv)):
        for a in names:
            if isinstance(getattr(attn, a, None), int):
                setattr(attn, a, value)


def shrink_module(model: nn.Module, module: Module, removed: list[Unit]) -> None:
    """Remove the elements (and KV heads) of `removed` from `module`, in place on `model`."""
    gone = {i for u in removed for i in u.members}
    gone_kv = {k for u in removed for k in u.kv}
    kept = [i for i in range(module.n_elements) if i not in gone]
    _slice_all(model, module.slices, kept)
    if module.kind != "attention":
        return
    kept_kv = [k for k in range(module.n_kv) if k not in gone_kv]
    if module.kv_slices:
        _slice_all(model, module.kv_slices, kept_kv)
    _set_counts(model.get_submodule(module.name), len(kept), len(kept_kv) if module.kv_slices else len(kept))


def apply_plan(model: nn.Module, modules: list[Module], removed: list[Unit]) -> None:
    gone = by_module(removed)
    for m in modules:
        if gone.get(m.name):
            shrink_module(model, m, gone[m.name])


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> None:
    """Delete decoder blocks; re-number `layer_idx` (KV cache slots) and the config's layer lists."""
    prefix, blocks = find_blocks(model)
    drop = set(indices)
    kept = [b for i, b in enumerate(blocks) if i not in drop]
    if not kept:

        raise MetricGPError("cannot remove every decoder block")
    parent, _, attr = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList(kept))
    for new_idx, block in enumerate(kept):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    old = len(blocks)
    config.num_hidden_layers = len(kept)
    for name in ("layer_types", "mlp_layer_types"):
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == old:
            setattr(config, name, [v for i, v in enumerate(values) if i not in drop])


def mask_plan(model: nn.Module, modules: list[Module], removed: list[Unit]) -> None:
    """Zero the output-projection columns of the removed elements, in place: the same logits as
    shrinking (a removed head or channel writes nothing), without copying the model. The metric
    search uses it as its fitness; restore the dense weights afterwards."""
    by_name = {m.name: m for m in modules}
    members: dict[str, list[int]] = {}
    for u in removed:
        members.setdefault(u.module, []).extend(u.members)
    with torch.no_grad():  # one index_fill_ per output projection, not one slice assignment per element
        for module, elements in members.items():
            out = by_name[module].slices[-1]
            weight = model.get_submodule(out.linear).weight
            first = torch.tensor(elements, device=weight.device).unsqueeze(1) * out.size
            columns = (first + torch.arange(out.size, device=weight.device)).flatten()
            weight.index_fill_(1, columns, 0.0)


def copy_block_by_block(model: nn.Module) -> tuple[nn.Module, Iterator[int]]:
    """A deep copy of `model` whose decoder blocks arrive one at a time: the copy starts without
    them, and each step of the iterator appends a deep copy of the next block, then yields its index,
    so a caller that shrinks block i before asking for block i+1 never holds a second dense model.
    Objects the blocks share with the rest of the model (the config) stay shared in the copy. The copy
    is complete once the iterator is exhausted."""
    _, blocks = find_blocks(model)
    copied_blocks = nn.ModuleList()
    memo: dict = {id(blocks): copied_blocks}
    twin = copy.deepcopy(model, memo)

    def arrive() -> Iterator[int]:
        for i, block in enumerate(blocks):
            copied_blocks.append(copy.deepcopy(block, dict(memo)))  # this block's copies freed with its memo
            yield i

    return twin, arrive()
