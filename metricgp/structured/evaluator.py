"""The structured-pruning evaluator: any metric -> importance of coupled structures -> a smaller model.

    pruner = StructuredPruner(setup)              # a PruningSetup: model, cached W/X/G, calibration
    units = pruner.score(tree, spec)              # scored removable units (heads, channels)
    removed = pruner.plan(units, spec)            # by allocation: uniform, global, or a keep map
    model, report = pruner.build(removed, spec)   # a physically smaller copy; the dense model stays

`prune(setup, tree, spec)` does all three. With `in_place=True` (`apply --structured`, which needs
the dense model no more once its perplexity is measured) the setup's own model is shrunk block by
block instead, each dense linear replaced by its shrunk one and freed as it goes, and the setup's
dense copy (`setup.dense`) is released: memory holds the model and one block's working set, never the
dense model beside the pruned one. The setup then describes the pruned model (`setup.model`,
`setup.layers`; its statistics stay the dense model's) and cannot restore the dense weights.

SAAP and the DarwinLM search call the same three steps with their own importances (`IMPORTANCES`,
or `UNIT_IMPORTANCES` for importances scored per unit, as SAAP's fusion) and keep maps (given, or
made by a `PLANNERS` allocation); they keep the dense model (copies).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from metricgp.errors import MetricGPError
from metricgp.expr import compile_metric
from metricgp.models import find_blocks, prunable_layers
from metricgp.structured import baselines
from metricgp.structured.allocate import ALLOCATIONS, allocate, from_keep_map
from metricgp.structured.groups import HEAD_MODES, Module, decoder_params, discover, linears_by_name, model_dims
from metricgp.structured.importance import (
    NORMALISATIONS,
    REDUCTIONS,
    Unit,
    by_module,
    element_scores,
    score_units_by_module,
)
from metricgp.structured.refit import OutputRefit
from metricgp.structured.saap import saap_units
from metricgp.structured.saap.allocation import stability_keep_map
from metricgp.structured.shrink import apply_plan, copy_block_by_block, remove_blocks
from metricgp.structured.speed import compare_speed

STRUCTURES = ("width", "depth")  # width: heads + channels; depth: whole decoder blocks


@dataclass(frozen=True)
class StructuredSpec:
    keep: float = 0.7  # fraction of decoder parameters kept
    importance: str = "metric"
    # defaults chosen by experiment (results/structured/defaults.md: wanda at 70% kept, validation ppl)
    reduction: str = "max"
    normalisation: str = "module-mean"
    allocation: str = "global"
    head_mode: str = "per-group"
    structures: str = "width"
    bias_compensation: bool = False  # FLAP: removed channels' mean output folded into a bias
    refit: bool = False  # least-squares refit of every pruned module's output projection (`refit.py`)
    keep_map: dict[str, float] | None = field(default=None, hash=False)
    options: dict | None = field(default=None, hash=False)  # method-specific (SAAP: estimators, spread ...)

    def validate(self) -> StructuredSpec:
        if not 0.0 < self.keep <= 1.0:
            raise MetricGPError(f"--keep must be in (0, 1], got {self.keep}")
        for name, value, choices in (
            ("importance", self.importance,
             {**IMPORTANCES, **UNIT_IMPORTANCES} if self.structures == "width" else BLOCK_IMPORTANCES),
            ("reduction", self.reduction, REDUCTIONS), ("normalisation", self.normalisation, NORMALISATIONS),
            ("allocation", self.allocation, {**ALLOCATIONS, **PLANNERS}), ("head mode", self.head_mode, HEAD_MODES),
            ("structures", self.structures, STRUCTURES),
        ):
            if value not in choices:
                raise MetricGPError(f"unknown {name} '{value}' (choose from {', '.join(choices)})")
        if self.refit and self.bias_compensation:
            raise MetricGPError("--refit and --bias-compensation both rewrite the output projection; choose one")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class DenseReleased:
    """What `setup.dense` becomes once its model was shrunk in place: there are no dense weights to restore."""

    def restore(self, names=None) -> None:
        raise MetricGPError("the dense weights were released: this setup's model was shrunk in place "
                            "(structured prune with in_place=True)")


def _metric_scores(pruner: StructuredPruner, tree, names: set[str]) -> dict[str, torch.Tensor]:
    if tree is None:
        raise MetricGPError("importance 'metric' needs --metric or --metric-file")

    return element_scores(compile_metric(tree), pruner.linears, pruner.setup.stats, names)


def _flap_scores(pruner: StructuredPruner, tree, names: set[str]) -> dict[str, torch.Tensor]:
    """Fluctuation on the output projections' columns; the input projections contribute nothing."""
    means = pruner.output_means()
    out: dict[str, torch.Tensor] = {}
    for n in names:
        w = pruner.linears[n].weight.detach()
        out[n] = baselines.flap_scores(w, pruner.setup.stats[n]["X"], means[n]) if n in means else torch.zeros_like(
            w, dtype=torch.float32)
    return out


# name -> fn(pruner, metric tree or None, linear names) -> element scores per linear
IMPORTANCES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "metric": _metric_scores,
    "flap": _flap_scores,
}


def _saap_units(pruner: StructuredPruner, tree, spec: StructuredSpec) -> list[Unit]:
    return saap_units(pruner, tree, spec)


def _stability_keep_map(pruner: StructuredPruner, units: list[Unit], spec: StructuredSpec) -> dict[str, float]:
    return stability_keep_map(pruner, units, spec)


# name -> fn(pruner, metric tree or None, spec) -> scored units: importances fused at unit level
UNIT_IMPORTANCES: dict[str, Callable[..., list[Unit]]] = {"saap": _saap_units}
# allocation name -> fn(pruner, units, spec) -> keep map: allocations that need more than the units
PLANNERS: dict[str, Callable[..., dict[str, float]]] = {"stability": _stability_keep_map}


def _metric_blocks(pruner: StructuredPruner, tree) -> list[float]:
    """Mean element score of each block's linears."""
    prefix, blocks = find_blocks(pruner.setup.model)
    names = {s.linear for m in pruner.modules for s in m.slices + m.kv_slices}
    scores = _metric_scores(pruner, tree, names)
    out = []
    for i in range(len(blocks)):
        mine = [s for n, s in scores.items() if n.startswith(f"{prefix}.{i}.")]
        out.append(float(sum(s.double().sum() for s in mine) / sum(s.numel() for s in mine)))
    return out


BLOCK_IMPORTANCES: dict[str, Callable[..., list[float]]] = {
    "metric": _metric_blocks,
    "shortgpt": lambda pruner, tree: baselines.block_influence(pruner.setup.model, pruner.setup.calib[:8]),
}


class StructuredPruner:
    """A dense model's coupled structures, scored and removed on copies."""

    def __init__(self, setup):
        self.setup = setup
        self.setup.dense.restore()
        self.modules: list[Module] = discover(setup.model)
        self.linears = linears_by_name(setup.model)
        self.dense_decoder_params = decoder_params(setup.model)
        self._means: dict[str, torch.Tensor] | None = None
        self.memo: dict[str, object] = {}  # derived results an importance computes once (SAAP's fusion)
        self.notes: dict[str, object] = {}  # what importances and planners decided, for the report

    def output_means(self) -> dict[str, torch.Tensor]:
        """Mean input of every output projection (o/down), one forward pass, computed once."""
        if self._means is None:
            outs = {m.slices[-1].linear: self.linears[m.slices[-1].linear] for m in self.modules}
            self._means = baselines.input_means(self.setup.model, outs, self.setup.calib)
        return self._means

    def score(self, tree, spec: StructuredSpec) -> list[Unit]:
        if spec.importance in UNIT_IMPORTANCES:
            return UNIT_IMPORTANCES[spec.importance](self, tree, spec)
        importance = IMPORTANCES[spec.importance]
        return score_units_by_module(self.modules, self.linears, lambda names: importance(self, tree, names),
                                     spec.reduction, spec.normalisation, spec.head_mode)

    def budget(self, spec: StructuredSpec) -> int:
        return self.dense_decoder_params - round(spec.keep * self.dense_decoder_params)

    def plan(self, units: list[Unit], spec: StructuredSpec) -> list[Unit]:
        if spec.keep_map is not None:
            return from_keep_map(units, spec.keep_map)
        if spec.allocation in PLANNERS:
            return from_keep_map(units, PLANNERS[spec.allocation](self, units, spec))
        return allocate(units, self.budget(spec), spec.allocation)

    def build(self, removed: list[Unit], spec: StructuredSpec, in_place: bool = False) -> nn.Module:
        """A physically smaller deep copy of the dense model without the `removed` units, copied a
        decoder block at a time and each block shrunk before the next is copied: memory holds the
        dense model, the smaller copy and one dense-sized block, never a second dense model.
        `in_place`: shrink the setup's own model instead, block by block (each replaced linear freed as
        it goes), and release the setup's dense copy (see the module doc): memory holds the model and
        one block's working set."""
        gone = {u.module for u in removed}
        if in_place:
            model, blocks = self._release_dense(spec), range(len(find_blocks(self.setup.model)[1]))
        else:
            model, blocks = copy_block_by_block(self.setup.model)
        for block in blocks:
            mine = [m for m in self.modules if m.block == block and m.name in gone]
            units = [u for u in removed if u.module in {m.name for m in mine}]
            if spec.bias_compensation:
                self._compensate(model, units)
            if spec.refit:
                self._refit(model, units, own=in_place)
            apply_plan(model, mine, units)
            if in_place:
                self._adopt(model, mine)
        if in_place:
            self._adopt(model)
        return model

    def _release_dense(self, spec: StructuredSpec) -> nn.Module:
        """Before the setup's model is shrunk in place: what needs the dense model is made first (the
        refit's Hessians), the model holds the dense weights, and the setup's dense copy is dropped."""
        if spec.refit:
            self.output_refit()  # the dense model's Hessians, computed (or read) before any block shrinks
        if spec.bias_compensation:
            self.output_means()  # the dense model's, likewise
        self.setup.dense.restore()
        self.setup.dense = DenseReleased()
        return self.setup.model

    def _adopt(self, model: nn.Module, modules: list[Module] | None = None) -> None:
        """Point the setup's and the pruner's linears at `model`'s own (those of `modules`; None: all),
        so the replaced dense linears have no reference left and are freed."""
        if modules is None:
            self.setup.layers.clear()
            self.setup.layers.update(prunable_layers(model))
            self.linears = linears_by_name(model)
            return
        for name in {s.linear for m in modules for s in m.slices + m.kv_slices}:
            new = model.get_submodule(name)
            self.linears[name] = new
            if name in self.setup.layers:
                self.setup.layers[name] = new

    def output_refit(self):
        """The least-squares refit of output projections (`refit.OutputRefit`), its Hessians loaded once."""
        if "refit" not in self.memo:
            self.memo["refit"] = OutputRefit(self.setup, self.modules)
        return self.memo["refit"]

    def _refit(self, model: nn.Module, removed: list[Unit], own: bool = False) -> None:
        """Each pruned module's output projection re-fitted to the dense output (its removed columns
        zero, so shrinking then drops them). `own`: the dense weight is the model's own (shrinking in
        place, before this block shrinks), else the setup's dense copy."""
        refit = self.output_refit()
        gone = by_module(removed)
        with torch.no_grad():
            for m in self.modules:
                if m.name in gone:
                    weight = model.get_submodule(m.slices[-1].linear).weight
                    weight.copy_(refit.weight(m, gone[m.name], dense=weight if own else None))

    def _compensate(self, model: nn.Module, removed: list[Unit]) -> None:
        means = self.output_means()
        modules = {m.name: m for m in self.modules}
        for name, units in by_module(removed).items():
            out = modules[name].slices[-1]  # the output projection's columns
            members = sorted({i for u in units for i in u.members})
            cols = torch.tensor([i * out.size + j for i in members for j in range(out.size)])
            parent, _, attr = out.linear.rpartition(".")
            new = baselines.compensate_bias(model.get_submodule(out.linear), cols, means[out.linear])
            setattr(model.get_submodule(parent), attr, new)

    def remove_depth(self, tree, spec: StructuredSpec,
                     in_place: bool = False) -> tuple[nn.Module, list[int], list[float]]:
        """Depth pruning: drop the least important blocks while the kept count stays >= target
        (`in_place`: from the setup's own model, as `build`)."""
        scores = BLOCK_IMPORTANCES[spec.importance](self, tree)
        _, blocks = find_blocks(self.setup.model)
        budget, dropped = self.budget(spec), []
        for i in sorted(range(len(blocks)), key=lambda i: (scores[i], i)):
            size = sum(p.numel() for p in blocks[i].parameters())
            if size <= budget and len(dropped) < len(blocks) - 1:
                dropped.append(i)
                budget -= size
        del blocks
        model = self._release_dense(spec) if in_place else copy.deepcopy(self.setup.model)
        remove_blocks(model, dropped)
        if in_place:
            self._adopt(model)
        return model, sorted(dropped), scores


def prune(setup, tree, spec: StructuredSpec, in_place: bool = False) -> tuple[nn.Module, dict]:
    """Prune a copy of `setup.model` by `spec` (`in_place`: the setup's model itself, its dense copy
    released; see the module doc); returns the smaller model and what was done."""
    spec.validate()
    pruner = StructuredPruner(setup)
    dense = model_sizes(setup.model)
    if spec.structures == "depth":
        model, dropped, scores = pruner.remove_depth(tree, spec, in_place)
        detail = {"removed_blocks": dropped, "block_scores": scores}
    else:
        removed = pruner.plan(pruner.score(tree, spec), spec)
        model = pruner.build(removed, spec, in_place)
        detail = {"removed_units": _removed_summary(removed), **pruner.notes}
    return model, {**size_report(dense, model, spec.keep), **detail}


def _removed_summary(removed: list[Unit]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for u in removed:
        entry = out.setdefault(u.module, {"kind": u.kind, "elements": 0, "kv_heads": 0, "params": 0})
        entry["elements"] += len(u.members)
        entry["kv_heads"] += len(u.kv)
        entry["params"] += u.params
    return out


def param_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes), counting tied tensors once."""
    seen: set[int] = set()
    n = b = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
            b += p.numel() * p.element_size()
    return n, b


def model_sizes(model: nn.Module) -> tuple[int, int, int]:
    """(decoder parameters, parameters, bytes) of `model`, tied tensors counted once."""
    return decoder_params(model), *param_bytes(model)


def size_report(dense: nn.Module | tuple[int, int, int], pruned: nn.Module, target: float) -> dict:
    """`dense`: the dense model, or its `model_sizes` (taken before it was shrunk in place)."""
    d_dec, d_all, d_bytes = model_sizes(dense) if isinstance(dense, nn.Module) else dense
    p_dec, p_all, p_bytes = model_sizes(pruned)
    return {
        "target_keep": target,
        "achieved_keep": p_dec / d_dec,
        "decoder_params": {"dense": d_dec, "pruned": p_dec},
        "params": {"dense": d_all, "pruned": p_all},
        "bytes": {"dense": d_bytes, "pruned": p_bytes},
    }


def attention_widths(model: nn.Module) -> list[int]:
    """Query width (heads x head_dim) of every block's attention: the attention-matmul FLOPs term."""
    head_dim = model_dims(model).head_dim
    return [m.n_elements * head_dim for m in discover(model) if m.kind == "attention"]


def speed_report(dense: nn.Module, pruned: nn.Module, **settings) -> dict:
    """Measured prefill/decode throughput ratios next to the parameter and FLOPs ratios
    (`settings`: `metricgp.structured.speed.measure_throughput`'s)."""

    return compare_speed(dense, pruned, dense_attn_widths=attention_widths(dense),
                         pruned_attn_widths=attention_widths(pruned), **settings)


def per_layer_sizes(model: nn.Module) -> dict[int, dict[str, int]]:
    """Heads, KV heads and MLP width of every block that differs from the global config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    glob = {"num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "intermediate_size": getattr(config, "intermediate_size", None)}
    sizes: dict[int, dict[str, int]] = {}
    for m in discover(model):
        layer = sizes.setdefault(m.block, {})
        if m.kind == "attention":
            layer["num_attention_heads"] = m.n_elements
            layer["num_key_value_heads"] = m.n_kv
        else:
            layer["intermediate_size"] = m.n_elements
    return {i: diff for i, layer in sizes.items() if (diff := {k: v for k, v in layer.items() if glob.get(k) != v})}
