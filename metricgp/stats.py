"""Per-layer calibration statistics, the GP's leaves beyond W: whatever `metricgp.expr.ops.LEAVES`
registers with source "inputs" or "gradients". Today, for every prunable linear layer:
  X[j]    = mean over calibration tokens of x_j^2          shape (1, in)   (Wanda uses sqrt(X))
  Hinv[j] = [(XᵀX/n + λI)^-1]_jj                             shape (1, in)   (SparseGPT's denominator)
  G[i,j]  = sqrt(sum over windows of g_ij^2)                shape (out, in) (GBLM-style l2 norm)
where g is the gradient of the causal-LM loss of one window on the dense model. W is read from
the model itself. The pass runs in float32 (bf16 gradients underflow) and the result is cached on
disk as safetensors under a key of model weights + data + windows + seqlen + seed, so a second
run loads in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from metricgp.blocks import BlockInputs, OutputHead, output_head
from metricgp.errors import MetricGPError
from metricgp.expr.ops import leaves_from
from metricgp.fileio import atomic_path
from metricgp.models import cache_root, find_blocks
from metricgp.offload import resident

STATS_VERSION = 1  # bump when the definition of X or G changes, to invalidate old caches


def stats_key(fingerprint: str, data: str, n_windows: int, seqlen: int, seed: int, grads: bool) -> str:
    payload = json.dumps(
        {"v": STATS_VERSION, "model": fingerprint, "data": data, "n": n_windows, "seqlen": seqlen,
         "seed": seed, "grads": grads},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@contextmanager
def layer_input_hooks(layers: dict[str, nn.Linear], consume: Callable[[str, torch.Tensor], None]):
    """While active, call consume(name, x) with each layer's input as float32 (tokens, in_features)."""

    def hook_for(name: str):
        def hook(_module, args, _output):
            consume(name, args[0].detach().reshape(-1, args[0].shape[-1]).float())

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_leaf_names(names: Iterable[str] | None = None) -> tuple[str, ...]:
    """The registered leaves computed from layer inputs (all, or those among `names`)."""
    return tuple(leaves_from("inputs", names))


def collect_input_stats(
    layers: dict[str, nn.Linear], run_forward: Iterable[None], leaves: Iterable[str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {leaf: tensor}} for every input leaf of the registry (or those in `leaves`), from
    whatever forward passes `run_forward` performs when iterated."""
    stat_of = leaves_from("inputs", leaves)
    states: dict[str, dict[str, torch.Tensor]] = {}
    counts = dict.fromkeys(layers, 0)

    def start(name: str, device: torch.device) -> dict[str, torch.Tensor]:
        width = layers[name].in_features
        return {leaf: st.statistic.start((width,), device) for leaf, st in stat_of.items()}

    def consume(name: str, x: torch.Tensor) -> None:
        # the states live where the inputs arrive (an offloaded model's weights are on the host, its
        # activations on the device)
        if name not in states:  # (not setdefault: a state can be a whole Gram matrix, made once)
            states[name] = start(name, x.device)
        for leaf, state in states[name].items():
            stat_of[leaf].statistic.add(state, x)
        counts[name] += x.shape[0]

    with layer_input_hooks(layers, consume):
        for _ in run_forward:
            pass
    for n in layers:  # a layer no input reached finishes from empty states
        if n not in states:
            states[n] = start(n, torch.device("cpu"))
    return {n: {leaf: stat_of[leaf].statistic.finish(state, counts[n]).cpu() for leaf, state in states[n].items()}
            for n in layers}


@contextmanager
def _float32(module: nn.Module):
    """`module` in float32 while inside (bf16 gradients underflow); its own dtype afterwards. Used on one
    block (or the output head) at a time, never on the whole model."""
    dtype = next(module.parameters()).dtype
    module.float()
    try:
        yield module
    finally:
        module.to(dtype)


@contextmanager
def _frozen(model: nn.Module):
    """No parameter asks for gradients inside (the backward pass enables exactly the ones it needs);
    flags and .grad restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def gradients_of(model: nn.Module, linears: dict[str, nn.Linear], grads: bool = True):
    """The model in float32 (bf16 gradients underflow) with gradients for the linears' weights
    only (none when not `grads`); dtype, flags and .grad restored afterwards. For a whole-model
    backward (SAAP's estimators); the statistics pass itself works a block at a time."""
    with _float32(model), _frozen(model):
        for m in linears.values():
            m.weight.requires_grad_(grads)
        yield


def layers_by_block(blocks: nn.ModuleList, layers: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    """The requested layers of each block, found by identity (callers name layers as they like)."""
    block_of = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    per_block: list[dict[str, nn.Linear]] = [{} for _ in blocks]
    for name, module in layers.items():
        if id(module) not in block_of:
            raise MetricGPError(f"statistics are computed for decoder-block linears; {name} is in no block")
        per_block[block_of[id(module)]][name] = module
    return per_block


def _head_gradient(head: OutputHead, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d(mean next-token NLL of one window) / d(last block's output), the logits made a chunk of positions
    at a time (a 128K-262K vocabulary's logits of a whole window never exist at once)."""
    h = hidden.detach().requires_grad_(True)
    normed = head.norm(h)
    leaf = normed.detach().requires_grad_(True)
    targets = ids.to(h.device)
    n = targets.shape[-1] - 1
    step = head.positions_per_chunk
    for first in range(0, n, step):
        last = min(first + step, n)
        logits = head.logits(leaf[0, first:last])
        (F.cross_entropy(logits, targets[first + 1 : last + 1], reduction="sum") / n).backward()
    normed.backward(leaf.grad)
    return h.grad


def compute_stats(
    model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor, grads: bool = True, desc: str = "stats",
    leaves: Iterable[str] | None = None, sink: Callable[[str, str, torch.Tensor], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Every registered input leaf (or those in `leaves`) of `layers`, and the gradient leaves too when
    `grads`, computed one decoder block at a time. Model left as it was. With `sink`, each finished
    statistic goes to `sink(layer, leaf, tensor)` the moment it is made, on the host, and is not kept
    (the result is then empty): a caller can stream a model's worth of G to disk instead of holding it.

    Forward: each block, in float32, runs over every calibration window's hidden states while hooks
    fold its linears' inputs into the input leaves; its outputs are the next block's inputs. Backward
    (gradient leaves): d loss / d(last hidden) per window from the output head, then each block, last
    first, is run again on its saved inputs and back-propagated per window; each weight gradient is
    folded into its leaf as it arrives and freed. The device holds the model plus one block's working
    set: no whole-model float32 copy, no live gradient for every weight, no whole-batch logits."""
    decoder_blocks = find_blocks(model)[1]
    per_block = layers_by_block(decoder_blocks, layers)
    grad_leaves = leaves_from("gradients", leaves) if grads else {}
    input_leaves = list(leaves_from("inputs", leaves))
    inputs = BlockInputs.capture(model, calib)
    head = output_head(model) if grad_leaves else None
    if grad_leaves and head is None:
        raise MetricGPError(f"gradient statistics need an output head of final norm -> LM head; "
                            f"{type(model).__name__}'s could not be found")
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers} if sink is None else {}

    def keep(name: str, leaf: str, t: torch.Tensor) -> None:
        if sink is None:
            out[name][leaf] = t
        else:
            sink(name, leaf, t)

    # each block's float32 inputs, kept for its backward pass on disk (a depth's worth of activations in
    # memory would outgrow a small model), read back memory-mapped
    scratch = tempfile.TemporaryDirectory(prefix="metricgp-stats-") if grad_leaves else contextlib.nullcontext()
    hidden = inputs.first_hidden
    blocks = range(len(decoder_blocks))
    with _frozen(model), scratch as scratch_dir:
        for i in tqdm(blocks, desc=f"{desc} (forward)", unit="block", leave=False):
            with resident(model, decoder_blocks[i]), _float32(decoder_blocks[i]), torch.no_grad():
                hidden = [h.float() for h in hidden]
                if grad_leaves:
                    torch.save(torch.cat(hidden).cpu(), Path(scratch_dir) / f"block-{i}.pt")
                outputs: list[torch.Tensor] = []

                def forward(i=i, hidden=hidden, outputs=outputs):
                    for h in hidden:
                        outputs.append(inputs.call(i, h))
                        yield None

                for name, per in collect_input_stats(per_block[i], forward(), input_leaves).items():
                    for leaf, t in per.items():
                        keep(name, leaf, t)
            hidden = outputs
        if not grad_leaves:
            return out
        with _float32(head.norm), _float32(head.lm_head):
            upstream = [_head_gradient(head, h, window) for h, window in zip(hidden, calib, strict=True)]
        del hidden
        for i in tqdm(reversed(blocks), total=len(blocks), desc=f"{desc} (backward)", unit="block", leave=False):
            with resident(model, decoder_blocks[i]):
                states, upstream = _backward_block(inputs, i, per_block[i], grad_leaves, upstream,
                                                   Path(scratch_dir) / f"block-{i}.pt")
            for name, per in states.items():
                for leaf, state in per.items():
                    keep(name, leaf, grad_leaves[leaf].statistic.finish(state, len(calib)).cpu())
    return out


def _backward_block(inputs: BlockInputs, i: int, layers: dict[str, nn.Linear], grad_leaves: dict,
                    upstream: list[torch.Tensor], saved_inputs: Path) -> tuple[dict, list[torch.Tensor]]:
    """Block i run again on its saved float32 inputs (deleted after) and back-propagated window by window,
    each weight gradient folded into the layers' gradient leaves as it arrives. Returns ({layer: {leaf:
    state}}, the gradients with respect to the block's inputs: the upstream of the block below)."""
    states = {name: {leaf: lf.statistic.start(tuple(m.weight.shape), m.weight.device)
                     for leaf, lf in grad_leaves.items()} for name, m in layers.items()}
    below = []
    with _float32(inputs.blocks[i]), _folding_gradients(layers, grad_leaves, states):
        saved = torch.load(saved_inputs, mmap=True, weights_only=True)
        for h, grad in zip(saved, upstream, strict=True):
            h = h.unsqueeze(0).to(grad.device).requires_grad_(True)
            inputs.call(i, h).backward(grad)
            below.append(h.grad)
        del saved
    saved_inputs.unlink()
    return states, below


@contextmanager
def _folding_gradients(layers: dict[str, nn.Linear], grad_leaves: dict, states: dict):
    """While inside, the layers' weights take gradients, and each gradient is folded into the layer's
    gradient leaves the moment it is accumulated, then freed (never a live .grad per weight)."""

    def fold(name: str):
        def hook(param: torch.Tensor) -> None:
            for leaf, state in states[name].items():
                grad_leaves[leaf].statistic.add(state, param.grad)
            param.grad = None

        return hook

    handles = []
    for name, module in layers.items():
        module.weight.requires_grad_(True)
        handles.append(module.weight.register_post_accumulate_grad_hook(fold(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in layers.values():
            module.weight.requires_grad_(False)
            module.weight.grad = None


def stats_cache_path(key: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root() / "stats") / f"{key}.safetensors"


def _flatten(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{layer}|{leaf}": t.contiguous() for layer, d in stats.items() for leaf, t in d.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        layer, leaf = key.rsplit("|", 1)
        out.setdefault(layer, {})[leaf] = t
    return out


def cached_stats(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    calib: torch.Tensor,
    key: str,
    grads: bool = True,
    cache_dir: Path | None = None,
    inputs: Iterable[str] | None = None,
    lazy: bool = False,
) -> tuple[Mapping[str, dict[str, torch.Tensor]], bool]:
    """Load statistics from the disk cache, or compute and store them. Returns (stats, was_cached).

    `inputs`: the input leaves the caller reads (None: every registered one). Only those are computed
    (Hinv's Cholesky inverse of a 14336-wide down_proj Gram costs minutes a block on a CPU, and a metric
    without it has no use for it); a cache that lacks some of them is completed in place (a forward-only
    pass for the missing leaves), so one cache per model and data serves every metric.

    `lazy` (an offloaded model's): the statistics are never all in memory. The pass hands each finished
    statistic to part files of at most PART_BYTES as it is made (`stats_parts_path`), and the result is a
    `LazyStats` that reads one layer's leaves from them when asked (G alone is twice a bf16 model's bytes in
    float32: 263 GiB for a 70B model). Otherwise one file, read whole."""
    path, parts = stats_cache_path(key, cache_dir), stats_parts_path(key, cache_dir)
    wanted_inputs = set(input_leaf_names(inputs))
    if path.is_file() and not lazy:
        stats = _unflatten(load_file(str(path)))
        if set(stats) == set(layers):
            missing = wanted_inputs - set.intersection(*(set(per) for per in stats.values()))
            if not missing:
                return stats, True
            extra = compute_stats(model, layers, calib, grads=False, desc="stats (new leaves)", leaves=missing)
            for n, per in extra.items():
                stats[n].update(per)
            save_stats(stats, path)
            return stats, True
    # a parts directory holds what a one-file cache of the same key held (and maybe more leaves): first
    files = sorted(parts.glob("*.safetensors")) if parts.is_dir() else [path] if path.is_file() else []
    if files:
        stats = LazyStats(files)
        if set(stats) == set(layers):
            missing = wanted_inputs - stats.common_leaves()
            if missing:  # (a one-file cache read lazily becomes a parts directory, so leaves can join it)
                target = parts if parts.is_dir() else _split(stats, parts)
                with _PartWriter(target, add=True) as writer:
                    compute_stats(model, layers, calib, grads=False, desc="stats (new leaves)", leaves=missing,
                                  sink=writer.add)
                stats = LazyStats(sorted(target.glob("*.safetensors")))
            return (stats if lazy else stats.load()), True
    t0 = time.time()
    leaves = None if inputs is None else wanted_inputs | (set(leaves_from("gradients")) if grads else set())
    if lazy:
        with _PartWriter(parts) as writer:
            compute_stats(model, layers, calib, grads=grads, leaves=leaves, sink=writer.add)
        return LazyStats(sorted(parts.glob("*.safetensors"))), False
    stats = compute_stats(model, layers, calib, grads=grads, leaves=leaves)
    save_stats(stats, path, time.time() - t0)
    return stats, False


def stats_parts_path(key: str, cache_dir: Path | None = None) -> Path:
    """The directory of part files a lazy statistics pass writes (`cached_stats(lazy=True)`)."""
    return (cache_dir or cache_root() / "stats") / f"{key}.parts"


def stats_cached(key: str, cache_dir: Path | None = None) -> bool:
    """Whether statistics under `key` are on disk, in either form."""
    return stats_cache_path(key, cache_dir).is_file() or stats_parts_path(key, cache_dir).is_dir()


PART_BYTES = 2**28  # a part file of lazily written statistics holds at most this much (256 MB) beyond one tensor


class LazyStats(Mapping):
    """{layer: {leaf: tensor}} over safetensors files of "layer|leaf" tensors, read a layer at a time when
    asked (each read a fresh tensor; nothing kept between reads): only the headers are held."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self._where: dict[str, dict[str, Path]] = {}
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    layer, leaf = name.rsplit("|", 1)
                    self._where.setdefault(layer, {})[leaf] = file

    def __getitem__(self, layer: str) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for leaf, file in self._where[layer].items():
            by_file.setdefault(file, []).append(leaf)
        out = {}
        for file, leaves in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for leaf in leaves:
                    out[leaf] = handle.get_tensor(f"{layer}|{leaf}")
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def common_leaves(self) -> set[str]:
        """The leaves every layer has."""
        return set.intersection(*(set(per) for per in self._where.values())) if self._where else set()

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every statistic in memory (the eager form)."""
        return {layer: self[layer] for layer in self}


class _PartWriter:
    """Statistics handed over one at a time (`compute_stats(sink=...)`), written as part files of about
    PART_BYTES. A new directory appears whole (written under a temporary name, renamed at the end); with `add`,
    the parts join an existing directory one complete file at a time."""

    def __init__(self, directory: Path, add: bool = False):
        self.directory, self.add_to = directory, add
        self.buffer: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.parts = 0  # written by this writer

    def __enter__(self) -> _PartWriter:
        self._atomic = None if self.add_to else atomic_path(self.directory)
        self.target = self.directory if self.add_to else self._atomic.__enter__()
        self.target.mkdir(parents=True, exist_ok=True)
        return self

    def add(self, layer: str, leaf: str, t: torch.Tensor) -> None:
        self.buffer[f"{layer}|{leaf}"] = t.contiguous()
        self.bytes += t.numel() * t.element_size()
        if self.bytes >= PART_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            name = f"part-{time.time_ns():x}-{self.parts:05d}.safetensors"  # unique beside another writer's
            self.parts += 1
            with atomic_path(self.target / name) as tmp:
                save_file(self.buffer, str(tmp))
        self.buffer, self.bytes = {}, 0

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.flush()
        if self._atomic is not None:
            self._atomic.__exit__(kind, value, traceback)


def _split(stats: LazyStats, parts: Path) -> Path:
    """A one-file cache as a parts directory (its file copied in as the first part), so leaves can be added."""
    with _PartWriter(parts) as writer:
        for layer in stats:
            for leaf, t in stats[layer].items():
                writer.add(layer, leaf, t)
    return parts


def save_stats(stats: dict[str, dict[str, torch.Tensor]], path: Path, seconds: float = 0.0) -> None:
    """Write `stats` where `cached_stats` reads them (`stats_cache_path`), atomically."""
    with atomic_path(path) as tmp:
        save_file(_flatten(stats), str(tmp), metadata={"seconds": f"{seconds:.1f}"})
