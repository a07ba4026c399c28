"""Running a causal LM one decoder block at a time, as SparseGPT, Wanda and llm-compressor do: capture
what the first block receives, run one block over every window, hand its outputs to the next. Only
one block's working set exists at a time, so the statistics pass and the sequential pruning modes need
the model plus one block, not a second model's worth of activations or gradients.

What a block receives besides the hidden states (rotary embeddings, the causal mask, ...) does not
depend on a window's tokens when every window has the same length and no padding, as calibration
windows do; it can differ between blocks (Gemma 3 alternates sliding and full attention), so it is
recorded per block, once. The output head (final norm, LM head, logit soft-capping) is found from the
modules and the config and checked against the model's own logits, never assumed from names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.models import find_blocks

# Logits are made a chunk of positions at a time wherever only a loss or a top-k is needed: with a
# 128K-262K vocabulary (Llama 3, Gemma 3) a batch's logits and log-softmax are gigabytes, more than a
# block. A chunk holds at most this many float32 values (256 MB).
LOGIT_CHUNK_ELEMENTS = 2**26


class _StopForward(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The positional and keyword inputs `block` receives for each window (the forward stops there)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for window in windows:
                try:
                    model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@dataclass
class BlockInputs:
    """Every block's non-hidden inputs (from one probe forward) and the first block's hidden states of
    every window; `call(i, hidden)` runs block i on one window's hidden states."""

    blocks: nn.ModuleList
    per_block: list[tuple[tuple, dict]]  # block i's (args, kwargs) of the probe window
    first_hidden: list[torch.Tensor]  # (1, seqlen, hidden) per window, on the model's device

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, windows: torch.Tensor) -> BlockInputs:
        _, blocks = find_blocks(model)
        per_block: list[tuple[tuple, dict]] = []
        hooks = [b.register_forward_pre_hook(lambda _m, a, k: per_block.append((a, k)), with_kwargs=True)
                 for b in blocks]
        try:
            device = next(model.parameters()).device
            model(input_ids=windows[:1].to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        first = [hidden_of(a, k) for a, k in capture_block_inputs(model, blocks[0], windows)]
        return cls(blocks, per_block, first)

    def call(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = with_hidden(*self.per_block[i], hidden)
        return run_block(self.blocks[i], args, kwargs)


@dataclass(frozen=True)
class OutputHead:
    """The last block's output -> logits: final norm, LM head, optional soft-capping (Gemma 2/3)."""

    norm: nn.Module
    lm_head: nn.Module
    softcap: float | None

    @property
    def positions_per_chunk(self) -> int:
        """How many positions' logits fit in one chunk of LOGIT_CHUNK_ELEMENTS."""
        return max(1, LOGIT_CHUNK_ELEMENTS // self.lm_head.weight.shape[0])

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Float32 logits from hidden states the final norm was already applied to."""
        out = self.lm_head(normed).float()
        return torch.tanh(out / self.softcap) * self.softcap if self.softcap else out

    def __call__(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.norm(last_hidden))


def last_block_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last decoder block's output for `ids` (what the output head reads), without the logits."""
    _, blocks = find_blocks(model)
    seen: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple)
                                                                               else out))
    try:
        model.get_decoder()(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[-1]


@torch.no_grad()
def output_head(model: nn.Module) -> OutputHead | None:
    """The model's output head, or None where it is not norm -> LM head (-> soft-capping): the module
    the decoder calls right after its last block is the norm, and the result is checked against the
    model's own logits on a few tokens."""
    get_head = getattr(model, "get_output_embeddings", None)
    lm_head = get_head() if get_head is not None else None
    if lm_head is None or getattr(model, "get_decoder", None) is None:
        return None
    try:
        _, blocks = find_blocks(model)
    except MetricGPError:
        return None
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, _a, out: calls.append((m, out)))
             for m in model.modules() if not list(m.children()) or m is blocks[-1]]
    device = lm_head.weight.device
    ids = torch.arange(1, 9, device=device).remainder(lm_head.weight.shape[0]).unsqueeze(0)
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for h in hooks:
            h.remove()
    after = [i for i, (m, _) in enumerate(calls) if m is blocks[-1]]
    if not after or after[-1] + 1 >= len(calls):
        return None
    last = calls[after[-1]][1]
    last = last[0] if isinstance(last, tuple) else last
    norm = calls[after[-1] + 1][0]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = OutputHead(norm, lm_head, getattr(config, "final_logit_softcapping", None))
    try:
        ok = torch.allclose(head(last), logits, rtol=1e-4, atol=1e-4)
    except (RuntimeError, TypeError):
        ok = False
    return head if ok else None
