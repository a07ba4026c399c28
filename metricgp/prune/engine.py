"""Applying a metric to a model: one mechanism for every linear layer of every architecture.

`DenseWeights` restores the dense weights so a candidate metric is applied and undone without
reloading the model (read back from the checkpoint where it can be, else from a kept copy).
`prune_oneshot` scores every layer from cached statistics of the
dense model (what the search uses); `prune_sequential` prunes block by block and recomputes each
block's calibration inputs after the earlier blocks were pruned (Wanda / Pruner-Zero style).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from metricgp.blocks import BlockInputs
from metricgp.errors import MetricGPError
from metricgp.models import CheckpointTensors, block_linears, find_blocks
from metricgp.offload import compute_device, resident
from metricgp.prune.patterns import Pattern, thread_pool
from metricgp.prune.reconstruct import hessian_hooks, least_squares_update
from metricgp.stats import collect_input_stats, input_leaf_names

MetricFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class DegenerateMetric(Exception):
    """The metric cannot rank weights (constant or non-finite scores); carries the reason."""


@dataclass
class PruneReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    pruned: int = 0
    total: int = 0

    @property
    def sparsity(self) -> float:
        return self.pruned / max(self.total, 1)

    def add(self, name: str, keep: torch.Tensor) -> None:
        zeros = keep.numel() - int(keep.sum())  # no negated temporary
        self.layer_sparsity[name] = zeros / keep.numel()
        self.pruned += zeros
        self.total += keep.numel()


class DenseWeights:
    """The dense weights of the prunable layers, to restore between candidates, without a second copy
    of the model where its checkpoint can be read back.

    With `checkpoint` (the safetensors the model was loaded from; `models.checkpoint_tensors`), a dense
    weight is read back from it, memory-mapped, only when needed; else a copy is kept, on the host when
    the layers live on an accelerator. Either way a layer whose tensor has not been written since the
    last restore (same tensor, same in-place version counter) is its own dense weight: pruning a freshly
    restored model reads nothing back, restoring copies only the layers that changed, and a command that
    prunes once (apply) never reads the checkpoint at all.

    The checkpoint is checked when this is made: every layer's name and shape, and the values of the
    first layer in the model's dtype (a checkpoint the loader transformed, by renaming, fusing or
    quantising, fails there); one that does not match is not used and a copy is kept instead."""

    def __init__(self, layers: dict[str, nn.Linear], checkpoint: CheckpointTensors | None = None):
        self.layers = layers
        self._checkpoint = checkpoint if checkpoint is not None and self._matches(layers, checkpoint) else None
        self._copy = None
        if self._checkpoint is None:
            self._copy = {n: m.weight.detach().to("cpu", copy=True) for n, m in layers.items()}
        self._marks = {n: self._mark(m) for n, m in layers.items()}
        self.weights = _DenseView(self)

    @property
    def source(self) -> str:
        """'checkpoint' (read back on demand) or 'copy' (kept in memory)."""
        return "copy" if self._checkpoint is None else "checkpoint"

    @staticmethod
    def _matches(layers: dict[str, nn.Linear], checkpoint: CheckpointTensors) -> bool:
        if any(checkpoint.shapes.get(f"{n}.weight") != tuple(m.weight.shape) for n, m in layers.items()):
            return False
        first, module = next(iter(layers.items()))
        try:
            stored = checkpoint[f"{first}.weight"].to(device=module.weight.device, dtype=module.weight.dtype)
        except (OSError, RuntimeError, ValueError):
            return False
        return torch.equal(stored, module.weight.detach())

    @staticmethod
    def _mark(module: nn.Linear) -> tuple[int, int, int]:
        w = module.weight
        return id(w), w.data_ptr(), w._version

    def unchanged(self, name: str) -> bool:
        """Whether layer `name` still holds its dense weight (not written since the last restore)."""
        return self._marks[name] == self._mark(self.layers[name])

    def _stored(self, name: str) -> torch.Tensor:
        return self._checkpoint[f"{name}.weight"] if self._checkpoint is not None else self._copy[name]

    def dense(self, name: str) -> torch.Tensor:
        """Layer `name`'s dense weight on the layer's device, in its dtype (read-only: it may be the layer's
        own tensor, the kept copy or a memory-mapped one)."""
        w = self.layers[name].weight
        if self.unchanged(name):
            return w.detach()
        return self._stored(name).to(device=w.device, dtype=w.dtype)

    def restore(self, names: Iterable[str] | None = None) -> None:
        """Copy the dense weights back into every changed layer (or the changed ones among `names`)."""
        changed = [n for n in (self.layers if names is None else names) if not self.unchanged(n)]
        with torch.no_grad():
            if self._checkpoint is None:
                for n in changed:
                    self.layers[n].weight.copy_(self._stored(n))
            else:
                # A file read is one thread's copy where torch's copy_ of a kept copy uses every thread:
                # reading the layers on as many threads (the reads release the GIL) keeps the restore
                # near the speed of the copy it replaced.
                def read(n: str) -> None:
                    self._checkpoint.read_into(f"{n}.weight", self.layers[n].weight)

                threads = min(torch.get_num_threads(), len(changed))
                if threads > 1:
                    list(thread_pool(threads).map(read, changed))
                else:
                    for n in changed:
                        read(n)
        for n in changed:
            self._marks[n] = self._mark(self.layers[n])


class _DenseView(Mapping):
    """`dense.weights[name]`: the dense weight of one layer (`DenseWeights.dense`)."""

    def __init__(self, owner: DenseWeights):
        self._owner = owner

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._owner.dense(name)

    def __iter__(self):
        return iter(self._owner.layers)

    def __len__(self) -> int:
        return len(self._owner.layers)


def metric_inputs(metric: MetricFn, weight: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The leaves `metric` reads, on the weight's device: statistics live on the host and only those the
    formula uses travel (a formula without G moves no G)."""
    used = getattr(metric, "leaves", None)
    return {"W": weight.float(), **{k: v.to(weight.device) for k, v in stats.items() if used is None or k in used}}


def layer_scores(
    metric: MetricFn, weight: torch.Tensor, stats: Mapping[str, torch.Tensor], name: str = ""
) -> torch.Tensor:
    """Scores of one layer in float32, checked for degeneracy."""
    try:
        scores = metric(metric_inputs(metric, weight, stats))
    except KeyError as err:
        raise MetricGPError(f"metric needs statistic {err} which was not computed for {name}") from err
    # one pass for both checks: a row's min or max is NaN/inf exactly when the row holds one
    row_min, row_max = torch.aminmax(scores, dim=-1)
    if not (torch.isfinite(row_min).all() and torch.isfinite(row_max).all()):
        raise DegenerateMetric(f"non-finite scores in {name}")
    if (row_min == row_max).all():
        raise DegenerateMetric(f"constant scores in every row of {name}")
    return scores


def mask_layer(module: nn.Linear, dense: torch.Tensor, keep: torch.Tensor) -> None:
    # Multiplying into the weight in place is ~30x faster than building a float mask and copying.
    with torch.no_grad():
        torch.mul(dense, keep, out=module.weight)


def prune_oneshot(
    dense: DenseWeights, stats: Mapping[str, Mapping[str, torch.Tensor]], metric: MetricFn, pattern: Pattern,
    device: torch.device | None = None,
) -> PruneReport:
    """Score every layer from the dense model's statistics and mask it. Raises DegenerateMetric.
    `device`: where the scores are computed when the weights live elsewhere (an offloaded model's blocks are
    in host memory: each weight visits the device to be scored and only its mask comes back)."""
    report = PruneReport()
    for name, module in dense.layers.items():
        w = dense.weights[name]
        scores = layer_scores(metric, w if device is None else w.to(device), stats[name], name)
        keep = pattern.mask(scores).to(w.device)
        mask_layer(module, w, keep)
        report.add(name, keep)
    return report


def prune_sequential(
    model: nn.Module,
    calib: torch.Tensor,
    grad_stats: Mapping[str, Mapping[str, torch.Tensor]] | None,
    metric: MetricFn,
    pattern: Pattern | Callable[[str], Pattern],
    reconstruct: bool = False,
) -> PruneReport:
    """Block-by-block pruning: the input leaves (X, Hinv) are recomputed on the already-pruned prefix;
    G stays the dense one.
    With `reconstruct`, the kept weights get a least-squares update (prune/reconstruct.py).
    `pattern` may be a function of the layer's name (non-uniform sparsity: OWL, EvoPress)."""

    pattern_of = pattern if callable(pattern) else (lambda name: pattern)
    input_leaves = set(input_leaf_names())  # the dense statistics of these are replaced, never mixed in
    # the input leaves the metric reads (compile_metric records them), recomputed on the pruned prefix
    needed = input_leaf_names(getattr(metric, "leaves", None))
    prefix, blocks = find_blocks(model)
    inputs = BlockInputs.capture(model, calib)  # each block's own mask and rotary inputs (Gemma 3 alternates)
    hidden = inputs.first_hidden
    report = PruneReport()
    with torch.no_grad():
        for i, block in enumerate(tqdm(blocks, desc="sequential", unit="block", leave=False)):
            with resident(model, block):  # an offloaded model's block on the device for all of its work
                linears = block_linears(block)
                hessians: dict[str, torch.Tensor] = {}
                with hessian_hooks(linears, hessians) if reconstruct else nullcontext():
                    fresh = collect_input_stats(linears, (inputs.call(i, h) for h in hidden), needed)
                for rel, module in linears.items():
                    name = f"{prefix}.{i}.{rel}"
                    dense_stats = (grad_stats or {}).get(name, {})
                    stats = {**{k: v for k, v in dense_stats.items() if k not in input_leaves}, **fresh[rel]}
                    w = module.weight.detach().clone()
                    keep = pattern_of(name).mask(layer_scores(metric, w, stats, name))
                    if reconstruct:
                        module.weight.copy_(least_squares_update(w, keep, hessians.pop(rel)))
                    else:
                        mask_layer(module, w, keep)
                    report.add(name, keep)
                hidden = [inputs.call(i, h) for h in hidden]
    return report


def _oneshot(setup, metric: MetricFn, pattern: Pattern) -> PruneReport:
    return prune_oneshot(setup.dense, setup.stats, metric, pattern, compute_device(setup.model))


def _sequential(setup, metric: MetricFn, pattern: Pattern) -> PruneReport:
    return prune_sequential(setup.model, setup.calib, setup.stats, metric, pattern)


def _reconstruct(setup, metric: MetricFn, pattern: Pattern) -> PruneReport:
    return prune_sequential(setup.model, setup.calib, setup.stats, metric, pattern, reconstruct=True)


# mode name -> fn(setup with .dense/.stats/.model/.calib, metric, pattern); one entry adds a mode.
PRUNE_MODES: dict[str, Callable[..., PruneReport]] = {
    "oneshot": _oneshot,
    "sequential": _sequential,
    "reconstruct": _reconstruct,  # sequential + least-squares refit of the kept weights (metric+reconstruction)
}
