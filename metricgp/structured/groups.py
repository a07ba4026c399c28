"""Coupled structures of a decoder block, found from shapes and the config, never from names.

A block's linear layers are grouped by their parent module. A parent whose linears are three
inputs (in = hidden) plus one output (out = hidden) is attention; one with one or two inputs of
equal width plus one output is an MLP (gate/up + down, or a plain two-layer MLP). Which input is
the query projection follows from the widths: with grouped-query attention q is the widest.

Removable units (the smallest pieces an allocation can take away):
- `head`    attention heads. With GQA there are two ways to stay valid (`HEAD_MODES`):
            `per-group` (default) removes the same number of query heads from every KV group:
            one unit is one query head of each group, K/V stay (DarwinLM keeps K/V heads too).
            It keeps the finest granularity a valid GQA layer allows and leaves the KV cache
            alone; `kv-group` removes whole KV groups (their query heads, K and V rows), which
            shrinks the KV cache but moves in steps of 1/n_kv of the layer (1/3 on SmolLM2).
            With plain multi-head attention both are the same: a unit is one head.
- `channel` one MLP intermediate channel: its rows in every input linear, its column in the output.
- `block`   a whole decoder block (depth pruning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.models import block_linears, find_blocks

HEAD_MODES = ("per-group", "kv-group")


@dataclass(frozen=True)
class Slice:
    """A run of `size` consecutive rows (axis 0) or columns (axis 1) of one linear, in blocks of
    `size`: index i of the unit means rows/columns [i*size, (i+1)*size)."""

    linear: str  # full module name
    axis: int  # 0: output rows (with their bias entries), 1: input columns
    size: int


@dataclass
class Module:
    """One prunable module (an attention or an MLP of one block) and how its units couple."""

    name: str  # full module name of the parent, e.g. model.layers.3.self_attn
    kind: str  # "attention" | "mlp"
    block: int
    slices: list[Slice]  # every coupled slice family; index i of each belongs to unit-element i
    n_elements: int  # heads (query heads) or channels
    group_size: int = 1  # query heads per KV group (attention), 1 for MLPs
    kv_slices: list[Slice] = field(default_factory=list)  # K/V rows (attention only)
    n_kv: int = 0

    def element_params(self, linears: dict[str, nn.Linear]) -> int:
        """Parameters removed with one element (one query head incl. its o columns, or one channel)."""
        return sum(_slice_params(linears[s.linear], s) for s in self.slices)

    def kv_params(self, linears: dict[str, nn.Linear]) -> int:
        return sum(_slice_params(linears[s.linear], s) for s in self.kv_slices)


def _slice_params(lin: nn.Linear, s: Slice) -> int:
    if s.axis == 0:
        return s.size * (lin.in_features + (lin.bias is not None))
    return s.size * lin.out_features


@dataclass(frozen=True)
class Dims:
    hidden: int
    head_dim: int


def model_dims(model: nn.Module) -> Dims:
    """Hidden size and head dimension from the config (the text config of multimodal models)."""
    config = getattr(model, "config", None)
    if config is None:
        raise MetricGPError(f"{type(model).__name__} has no config: cannot find hidden size and head_dim")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not hidden or not head_dim:
        raise MetricGPError("the model config gives no hidden_size / num_attention_heads: cannot find heads")
    return Dims(int(hidden), int(head_dim))


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _classify(parent: str, linears: dict[str, nn.Linear], dims: Dims, prefix: str, block: int) -> Module | None:
    """An attention or MLP module from the linears sharing one parent (in forward-call order), or
    None if neither. The output projection is the last one called: shapes alone cannot tell a
    square q_proj from o_proj."""
    *ins, out = linears
    if linears[out].out_features != dims.hidden or any(linears[n].in_features != dims.hidden for n in ins):
        return None
    full = f"{prefix}.{block}.{parent}" if parent else f"{prefix}.{block}"
    widths = sorted({linears[n].out_features for n in ins})
    if len(ins) == 3 and linears[out].in_features == max(widths) and max(widths) % dims.head_dim == 0:
        return _attention(full, block, linears, ins, out, dims.head_dim, prefix)
    if len(ins) in (1, 2) and len(widths) == 1 and linears[out].in_features == widths[0]:
        name = lambda n: f"{prefix}.{block}.{n}"  # noqa: E731
        slices = [Slice(name(n), 0, 1) for n in ins] + [Slice(name(out), 1, 1)]
        return Module(full, "mlp", block, slices, widths[0])
    return None


def _attention(full: str, block: int, linears: dict, ins: list[str], out: str, hd: int, prefix: str) -> Module:
    name = lambda n: f"{prefix}.{block}.{n}"  # noqa: E731
    q_width = max(linears[n].out_features for n in ins)
    queries = [n for n in ins if linears[n].out_features == q_width]
    if len(queries) == 3:  # multi-head attention: q, k, v alike; a unit is one whole head
        slices = [Slice(name(n), 0, hd) for n in ins] + [Slice(name(out), 1, hd)]
        return Module(full, "attention", block, slices, q_width // hd, 1, [], q_width // hd)
    if len(queries) != 1:
        raise MetricGPError(f"cannot tell the query projection in {full}: input widths "
                            f"{[linears[n].out_features for n in ins]}")
    kv = [n for n in ins if n != queries[0]]
    n_q, n_kv = q_width // hd, linears[kv[0]].out_features // hd
    if n_q % n_kv:
        raise MetricGPError(f"{full}: {n_q} query heads do not split into {n_kv} KV groups")
    slices = [Slice(name(queries[0]), 0, hd), Slice(name(out), 1, hd)]
    return Module(full, "attention", block, slices, n_q, n_q // n_kv, [Slice(name(n), 0, hd) for n in kv], n_kv)


def discover(model: nn.Module, dims: Dims | None = None) -> list[Module]:
    """Every attention and MLP module of every decoder block, in block order."""
    dims = dims or model_dims(model)
    prefix, blocks = find_blocks(model)
    order = _call_order(model, blocks[0])
    found: list[Module] = []
    for i, block in enumerate(blocks):
        by_parent: dict[str, dict[str, nn.Linear]] = {}
        linears = block_linears(block)
        for rel in sorted(linears, key=lambda n: order.get(n, len(order))):
            by_parent.setdefault(_parent(rel), {})[rel] = linears[rel]
        modules = [m for p, lins in by_parent.items() if (m := _classify(p, lins, dims, prefix, i))]
        kinds = sorted(m.kind for m in modules)
        if kinds != ["attention", "mlp"]:
            names = ", ".join(f"{n} {tuple(m.weight.shape)}" for n, m in block_linears(block).items())
            raise MetricGPError(f"block {i}: expected one attention and one MLP, found {kinds or 'none'} "
                                f"among linears {names} (fused qkv and mixture-of-experts are not supported)")
        found.extend(modules)
    return found


def _call_order(model: nn.Module, block: nn.Module) -> dict[str, int]:
    """The order in which one block calls its linears, from a two-token forward pass."""
    order: dict[str, int] = {}

    def record(name: str):
        def hook(*_):
            order.setdefault(name, len(order))  # a hook returning a value would replace the output

        return hook

    hooks = [lin.register_forward_hook(record(name)) for name, lin in block_linears(block).items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return order


def linears_by_name(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def decoder_params(model: nn.Module) -> int:
    """Parameters inside the decoder blocks: what `--keep` is a fraction of."""
    _, blocks = find_blocks(model)
    return sum(p.numel() for p in blocks.parameters())
