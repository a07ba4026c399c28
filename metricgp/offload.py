"""Block-by-block offloading: a model larger than its device runs with its decoder blocks in host memory
and one block at a time on the device, as the sequential pipelines of SparseGPT and llm-compressor do.

Where things live once `BlockOffload.install` has run:
- everything outside the decoder blocks (embeddings, final norm, LM head, rotary tables) is on the
  device, always;
- every decoder block is in host memory (pinned beside a CUDA device, for fast copies) and is on the
  device only while it runs. A whole-model forward (evaluation, the search's fitness, capturing a
  block's inputs) moves the blocks one at a time through forward hooks; a block-by-block pipeline
  (statistics, sequential pruning, Hessians) keeps its block resident across every calibration window
  with `resident(model, block)`, so a block crosses the bus once per pass, not once per window.

Only a parameter's `.data` moves, never the parameter: optimisers, gradient hooks and the layer tables
that name a model's linears keep working. A block that was not written while resident gets its own
host tensors back (no copy, and `DenseWeights` still sees it as dense); a tensor that was written
(pruned, re-fitted), re-typed or replaced (a shrunk linear) is copied home. Nothing here depends on an
architecture: the blocks are whatever `models.find_blocks` found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_ATTRIBUTE = "_metricgp_offload"


def _slots(module: nn.Module) -> Iterator[tuple[dict, str, str, torch.Tensor]]:
    """(table, kind, key, tensor) of every parameter and buffer under `module`, where `table[key]` holds it."""
    for sub in module.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(sub, kind)
            for key, t in table.items():
                if t is not None:
                    yield table, kind, key, t


class BlockOffload:
    """The offloading state of one model: which blocks are resident, and what each one's host tensors are."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.device = torch.device(device)
        self.home = torch.device("cpu")
        self.blocks = blocks
        self._depth: dict[int, int] = {}  # id(block) -> how many enters are open
        self._saved: dict[int, list] = {}  # id(block) -> [(table, kind, key, host tensor, resident tensor, version)]
        self._stay: set[int] = set()  # ids of parameters that live on the device whatever block they are in
        self.pin = True  # page-locked host copies, until the host refuses one
        self.moves = 0  # blocks moved to the device so far
        self.peak_resident = 0  # most blocks resident at once

    @classmethod
    def install(cls, model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> BlockOffload:
        """Move everything outside `blocks` to `device`, keep the blocks on the host, and hook each block so it
        is on the device while it runs."""
        offload = cls(blocks, torch.device(device))
        inside = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
        with torch.no_grad():
            for table, kind, key, t in _slots(model):
                offload._put(table, kind, key, t.data.to(offload.home if id(t) in inside else offload.device))
        for block in blocks:
            block.register_forward_pre_hook(lambda m, _args: offload.enter(m))
            block.register_forward_hook(lambda m, _args, _out: offload.leave(m), always_call=True)
        setattr(model, _ATTRIBUTE, offload)
        return offload

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in page-locked memory beside a CUDA device (copies at full bus speed, asynchronously); as it is
        where the host cannot lock more (pinning most of a host's memory can fail)."""
        if self.pin and self.device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            try:
                return t.pin_memory()
            except RuntimeError:
                self.pin = False
        return t

    def _put(self, table: dict, kind: str, key: str, data: torch.Tensor) -> None:
        if data.device.type == "cpu":
            data = self._pinned(data)
        if kind == "_parameters":
            table[key].data = data
        else:
            table[key] = data

    @property
    def resident_blocks(self) -> int:
        return sum(1 for depth in self._depth.values() if depth > 0)

    def enter(self, block: nn.Module) -> None:
        """Put `block` on the device (nested enters count; only the first moves anything)."""
        k = id(block)
        self._depth[k] = self._depth.get(k, 0) + 1
        if self._depth[k] > 1:
            return
        saved = []
        with torch.no_grad():
            for table, kind, key, t in _slots(block):
                if id(t) in self._stay or (t.device == self.device != self.home):
                    continue  # already there
                # copy=True: on a CPU "device" (tests) the block still gets tensors of its own
                on_device = t.data.to(self.device, non_blocking=True, copy=True)
                if kind == "_parameters":
                    host, t.data = t.data, on_device
                    resident_tensor = t
                else:
                    host, table[key] = t, on_device
                    resident_tensor = on_device
                saved.append((table, kind, key, host, resident_tensor, resident_tensor._version))
        self._saved[k] = saved
        self.moves += 1
        self.peak_resident = max(self.peak_resident, self.resident_blocks)

    def leave(self, block: nn.Module) -> None:
        """Send `block` home once its last enter closes: an unwritten tensor gets its host storage back
        (nothing copied), a written one is copied into it, a re-typed or new one is copied home."""
        k = id(block)
        if self._depth.get(k, 0) == 0:
            return
        self._depth[k] -= 1
        if self._depth[k] > 0:
            return
        with torch.no_grad():
            for table, kind, key, host, resident_tensor, version in self._saved.pop(k):
                current = table.get(key)
                if current is not resident_tensor or current.dtype != host.dtype or current.shape != host.shape:
                    continue  # replaced or re-typed while resident: the sweep below sends it home
                if current._version != version:  # written while resident (pruned, re-fitted)
                    host.copy_(current.data)
                self._put(table, kind, key, host)
            # anything else still on the device (a replaced linear, a re-typed tensor) goes home too
            for table, kind, key, t in _slots(block):
                if id(t) not in self._stay and t.device != self.home:
                    self._put(table, kind, key, t.data.to(self.home))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @contextmanager
    def on_device(self, params: list[nn.Parameter]) -> Iterator[None]:
        """`params` (a recovery's adapters) on the device while inside, whichever block they sit in: trained
        there, their gradients and optimizer state never cross the bus; home again afterwards (an adapter is
        merged into its host weight on the host)."""
        with torch.no_grad():
            for p in params:
                p.data = p.data.to(self.device)
        self._stay.update(id(p) for p in params)
        try:
            yield
        finally:
            self._stay.difference_update(id(p) for p in params)
            with torch.no_grad():
                for p in params:
                    p.data = p.data.to(self.home)
                    if p.grad is not None:
                        p.grad = p.grad.to(self.home)


def offload_of(model: nn.Module) -> BlockOffload | None:
    """The model's offloading state, or None when every block lives on the device."""
    return getattr(model, _ATTRIBUTE, None)


def compute_device(model: nn.Module) -> torch.device | None:
    """Where work on an offloaded model's weights should run (None: where the weights are)."""
    offload = offload_of(model)
    return offload.device if offload is not None else None


@contextmanager
def resident(model: nn.Module, block: nn.Module) -> Iterator[None]:
    """`block` on the device while inside (nothing happens when the model is not offloaded)."""
    offload = offload_of(model)
    if offload is None:
        yield
        return
    offload.enter(block)
    try:
        yield
    finally:
        offload.leave(block)
