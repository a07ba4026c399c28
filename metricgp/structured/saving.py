"""Save and reload structurally pruned causal LMs whose blocks have different widths.

A pruned checkpoint is an ordinary Hugging Face directory (safetensors weights, generation config,
tokenizer). Its `config.json` is the base model's full config with these changes:

- `"model_type": "metricgp_pruned"` and `"architectures": ["MetricGPPrunedForCausalLM"]`, so that
  transformers without metricgp refuses it by name instead of building dense shapes;
- `"base_model_type"`: the architecture to rebuild (`"llama"`, `"gemma3_text"`, ...);
- `"per_layer_config"`: the caller's per-block semantic sizes, in transformers' standard field
  (global values stay the dense ones, as that field requires);
- `"pruned_blocks"`: for each block index, what differs from a block freshly built from the base
  config, found by comparing modules, never by their names: the `linears` (relative name ->
  out_features, in_features, bias) and the int attributes (`ints`, "module.attr" -> value).
  Removed blocks need no entry: the base config already has the smaller `num_hidden_layers`.

Loading builds the base architecture from the base config (without `per_layer_config`, whose
attributes cannot be read globally), replaces those linears, sets those ints, loads the weights
strictly and re-ties tied embeddings. The model is then re-classed to a cached subclass of its
own class (same name, so `isinstance` and `type(m).__name__` are unchanged) whose only change is
`save_pretrained`, which writes this format again: Trainer checkpoints and merged PEFT models
stay reloadable. The per-block sizes it was loaded with ride along in `_pruned_per_layer`.

`import metricgp` registers `PrunedConfig` with `AutoConfig` and `MetricGPPrunedForCausalLM` with
`AutoModelForCausalLM`; its `from_pretrained` delegates to `load_pruned`, so
`AutoModelForCausalLM.from_pretrained(path)` works without `trust_remote_code`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig

from metricgp.errors import MetricGPError
from metricgp.models import block_linears, find_blocks, resolve_device

MODEL_TYPE = "metricgp_pruned"
_OWN_KEYS = ("model_type", "base_model_type", "pruned_blocks", "per_layer_config", "architectures",
             "transformers_version")
# What a pruned checkpoint does with `from_pretrained`'s keyword arguments (transformers 5.x). Honoured:
# `config`, `dtype`/`torch_dtype`, `device_map` (one device), `attn_implementation`, `variant`,
# `state_dict`, `generation_config`, `output_loading_info`, and these, which locate the files:
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
# Ignored, because they cannot change what is loaded here: bookkeeping of the auto classes and pipelines,
# remote code (there is none), loading strategies (weights are always read strictly from safetensors,
# which run no code, so `weights_only`/`use_safetensors` hold anyway) and the adapter of a PEFT checkpoint.
_IGNORED_KWARGS = ("_from_auto", "_from_pipeline", "_commit_hash", "trust_remote_code", "adapter_kwargs",
                   "adapter_name", "low_cpu_mem_usage", "use_safetensors", "weights_only", "disable_mmap",
                   "tqdm_class", "ignore_mismatched_sizes", "key_mapping")
# Any other argument is refused by name, unless it carries an empty value, which is how the auto classes
# forward arguments the caller never gave (`gguf_file=None`, `subfolder=""` before it was honoured here):
# a new forwarded argument must not break loading.


class PrunedConfig(PreTrainedConfig):
    """The on-disk config: the base config's fields plus the pruning record (see module docstring)."""

    model_type = MODEL_TYPE
    base_model_type: str | None = None
    pruned_blocks: dict | None = None

    def base_config(self) -> PreTrainedConfig:
        """The dense architecture's config, without the per-layer overrides, to build the model from."""
        if self.base_model_type not in CONFIG_MAPPING:
            raise MetricGPError(f"pruned checkpoint of unknown base model type '{self.base_model_type}'")
        fields = {k: v for k, v in self.to_dict().items() if k not in _OWN_KEYS}
        return CONFIG_MAPPING[self.base_model_type].from_dict(fields)

    def per_layer(self) -> dict[int, dict] | None:
        """The per-block sizes as given to `save_pruned` (minus entries equal to the global value)."""
        overrides = self.to_dict().get("per_layer_config")
        return {int(k): v for k, v in overrides.items()} if overrides else None


def _is_empty(value) -> bool:
    """None, False, "" or an empty container: what an argument nobody gave is forwarded as."""
    if isinstance(value, str | dict | list | tuple):
        return not value
    return value is None or value is False


class MetricGPPrunedForCausalLM:
    """Auto-class entry for `metricgp_pruned` checkpoints. It is never instantiated:
    `from_pretrained` returns the base architecture's model, shrunk (see `load_pruned`)."""

    config_class = PrunedConfig

    @classmethod
    def from_pretrained(cls, path, *model_args, config: PrunedConfig | None = None, **kwargs):
        """What `AutoModelForCausalLM.from_pretrained(path, ...)` calls; dtype defaults to "auto" as there.
        Returns the model, or `(model, loading_info)` with `output_loading_info=True`."""
        if model_args:
            raise TypeError("pruned checkpoints take no positional model arguments")
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or "auto"
        kwargs.pop("torch_dtype", None)
        device = kwargs.pop("device_map", None)
        attn = kwargs.pop("attn_implementation", None)
        subfolder = kwargs.pop("subfolder", "") or ""
        variant = kwargs.pop("variant", None)
        state_dict = kwargs.pop("state_dict", None)
        generation_config = kwargs.pop("generation_config", None)
        loading_info = kwargs.pop("output_loading_info", False)
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        unsupported = sorted(k for k, v in kwargs.items() if k not in _IGNORED_KWARGS and not _is_empty(v))
        if unsupported:
            raise TypeError(f"not supported when loading a pruned checkpoint: {', '.join(unsupported)}")
        model = load_pruned(_local_dir(path, subfolder, hub), dtype, device, config=config,
                            attn_implementation=attn, variant=variant, state_dict=state_dict)
        if generation_config is not None:
            model.generation_config = generation_config
        if loading_info:  # the load is strict: nothing can be missing, unexpected or mismatched
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    @classmethod
    def _from_config(cls, config: PrunedConfig, **kwargs) -> nn.Module:
        """What `AutoModelForCausalLM.from_config(config)` calls: the pruned shapes, random weights."""
        dtype = _resolve_dtype(kwargs.pop("dtype", "auto"), config)
        return build_pruned(config, dtype, kwargs.pop("attn_implementation", None), init=True)


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` recognise `metricgp_pruned` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, PrunedConfig, exist_ok=True)
    AutoModelForCausalLM.register(PrunedConfig, MetricGPPrunedForCausalLM, exist_ok=True)


# ---------------------------------------------------------------- the record: what differs per block


def _linear_spec(lin: nn.Linear) -> dict:
    return {"out_features": lin.out_features, "in_features": lin.in_features, "bias": lin.bias is not None}


def _int_attrs(module: nn.Module) -> dict[str, int]:
    """Public int attributes (head counts, group sizes, layer_idx, ...); bools are not ints here."""
    return {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}


def _block_diff(block: nn.Module, reference: nn.Module) -> dict:
    """Linears whose shape or bias differ from `reference`, and int attributes that differ or are new."""
    ref_linears = block_linears(reference)
    linears = {name: _linear_spec(lin) for name, lin in block_linears(block).items()
               if name not in ref_linears or _linear_spec(lin) != _linear_spec(ref_linears[name])}
    ref_modules = dict(reference.named_modules())
    ints = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            continue  # its sizes are in `linears`
        ref_ints = _int_attrs(ref_modules[name]) if name in ref_modules else {}
        for attr, value in _int_attrs(module).items():
            if ref_ints.get(attr) != value:
                ints[f"{name}.{attr}" if name else attr] = value
    return {key: value for key, value in (("linears", linears), ("ints", ints)) if value}


def apply_record(model: nn.Module, pruned_blocks: dict) -> None:
    """Give a freshly built base model the pruned shapes: replace linears, set int attributes."""
    _, blocks = find_blocks(model)
    for key, diff in pruned_blocks.items():
        block = blocks[int(key)]
        for name, spec in diff.get("linears", {}).items():
            like = next(block.parameters())
            new = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                            device=like.device, dtype=like.dtype)
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, new)
        for path, value in diff.get("ints", {}).items():
            owner, _, attr = path.rpartition(".")
            setattr(block.get_submodule(owner), attr, value)


def _base_class(model: nn.Module) -> type:
    return getattr(type(model), "_pruned_base", type(model))


def _meta_twin(model: nn.Module) -> nn.Module:
    """The same class built from the same config on the meta device: free, and dense where not deleted."""
    with torch.device("meta"), _no_init():
        return _base_class(model)(copy.deepcopy(model.config))


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_blocks(model: nn.Module) -> dict[str, dict]:
    """The `pruned_blocks` record of `model`, checked to rebuild exactly its parameter shapes."""
    _, blocks = find_blocks(model)
    if model.config.num_hidden_layers != len(blocks):
        raise MetricGPError(f"config.num_hidden_layers is {model.config.num_hidden_layers} but the model has "
                            f"{len(blocks)} blocks: update the config when deleting blocks")
    twin = _meta_twin(model)
    _, twin_blocks = find_blocks(twin)
    diffs = (_block_diff(block, ref) for block, ref in zip(blocks, twin_blocks, strict=True))
    record = {str(i): diff for i, diff in enumerate(diffs) if diff}
    apply_record(twin, record)
    want, got = _shapes(model), _shapes(twin)
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise MetricGPError(f"cannot record this pruning (only linears and int attributes are): {', '.join(bad[:5])}")
    return record


# ---------------------------------------------------------------- saving


def pruned_config(model: nn.Module, per_layer: dict[int, dict] | None = None) -> PrunedConfig:
    """The config that `save_pruned` writes for `model` (validated before anything is written)."""
    base = model.config
    fields = base.to_dict()
    fields.setdefault("num_hidden_layers", base.num_hidden_layers)  # configs that alias it (n_layer)
    fields.update(base_model_type=base.model_type, pruned_blocks=describe_blocks(model),
                  architectures=[MetricGPPrunedForCausalLM.__name__], per_layer_config=per_layer or None,
                  dtype=getattr(model, "dtype", None))
    for key in ("model_type", "transformers_version"):
        fields.pop(key, None)
    return PrunedConfig(**fields)


def save_pruned(model: nn.Module, path, tokenizer=None, per_layer: dict[int, dict] | None = None,
                **save_kwargs) -> None:
    """Write a pruned checkpoint that `load_pruned` / `AutoModelForCausalLM.from_pretrained` reload.

    `per_layer` maps block indices of the pruned model (after deletions) to semantic sizes, e.g.
    `{3: {"num_attention_heads": 6, "intermediate_size": 1000}}`; it defaults to what the model was
    loaded with. `save_kwargs` go to transformers' `save_pretrained` (sharding, `state_dict`, ...).
    """
    if save_kwargs.get("push_to_hub"):
        raise MetricGPError("save_pruned writes a local directory; push it to the hub afterwards")
    if per_layer is None:
        per_layer = getattr(model, "_pruned_per_layer", None)
    config = pruned_config(model, per_layer)
    path = Path(path)
    # runtime parameter names, not a legacy layout, so they match the rebuilt model one to one
    save_kwargs.setdefault("save_original_format", False)
    _base_class(model).save_pretrained(model, path, **save_kwargs)
    if save_kwargs.get("is_main_process", True):
        config.to_json_file(path / "config.json", use_diff=False)  # full: the base defaults may differ
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


@functools.cache
def _pruned_class(base: type) -> type:
    """A subclass of `base` with the same name whose `save_pretrained` writes the pruned format."""
    def save_pretrained(self, save_directory, **kwargs) -> None:
        save_pruned(self, save_directory, **kwargs)

    return type(base.__name__, (base,), {"save_pretrained": save_pretrained, "_pruned_base": base,
                                         "__module__": __name__, "__doc__": base.__doc__})


# ---------------------------------------------------------------- loading


def _no_init():
    """Skip random initialisation of weights that are about to be overwritten (a context manager)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: just slower
        return contextlib.nullcontext()
    return no_init_weights()


def _resolve_dtype(dtype, config: PreTrainedConfig) -> torch.dtype:
    """None -> torch's default (float32); "auto" -> the checkpoint's dtype; a name or dtype -> itself."""
    if dtype is None:
        return torch.get_default_dtype()
    if dtype == "auto":
        dtype = config.dtype or torch.get_default_dtype()
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _resolve_device(device) -> torch.device:
    """A device or its name ("auto" picks CUDA when present), or a device map that puts everything on one
    device; a map over several devices is not supported."""
    if isinstance(device, dict) and len(set(map(str, device.values()))) == 1:
        device = next(iter(device.values()))
        device = f"cuda:{device}" if isinstance(device, int) else device
    if isinstance(device, dict):
        raise MetricGPError("pruned checkpoints load onto one device; a per-module device_map is not supported")
    return resolve_device(device) if isinstance(device, str) else torch.device(device)


def _local_dir(path, subfolder: str, hub: dict) -> Path:
    """A local checkpoint directory (`path/subfolder`); a hub id is downloaded first, with the hub
    arguments (revision, cache_dir, local_files_only, token, force_download, proxies) honoured."""
    if Path(path).is_dir():
        return Path(path) / subfolder
    from huggingface_hub import snapshot_download

    accepted = inspect.signature(snapshot_download).parameters
    hub = {k: v for k, v in hub.items() if k in accepted}  # huggingface_hub 1.x has no `proxies`
    patterns = {"allow_patterns": [f"{subfolder}/*"]} if subfolder else {}
    return Path(snapshot_download(str(path), **hub, **patterns)) / subfolder


def _read_weights(path: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    stem = f"model.{variant}" if variant else "model"
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / f"{stem}.safetensors").is_file():
        files = [f"{stem}.safetensors"]
    else:
        raise MetricGPError(f"no {stem}.safetensors (or index) in {path}")
    state = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every key exactly once; a key tied to a loaded one (lm_head = embeddings) counts as loaded."""
    owners: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # keep_vars: the shared objects themselves
        owners.setdefault(id(tensor), []).append(name)
    state = dict(state)
    for names in owners.values():
        present = [n for n in names if n in state]
        for n in names:
            if present and n not in state:
                state[n] = state[present[0]]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MetricGPError(f"pruned weights do not fit the recorded shapes: {err}") from err


def build_pruned(config: PrunedConfig, dtype: torch.dtype, attn_implementation: str | None = None,
                 init: bool = False) -> nn.Module:
    """The base architecture with the recorded shapes, embeddings tied, re-classed to save as pruned.

    Weights are random if `init`, else left uninitialised because they are about to be loaded."""

    attn = attn_implementation or config._attn_implementation  # from_pretrained puts it on the config
    kwargs = {"attn_implementation": attn} if attn else {}
    with contextlib.nullcontext() if init else _no_init():
        model = AutoModelForCausalLM.from_config(config.base_config(), dtype=dtype, **kwargs)
        apply_record(model, config.pruned_blocks or {})
    if init:
        model.init_weights()  # the replaced linears get the architecture's initialisation too
    model.tie_weights()
    model.__class__ = _pruned_class(type(model))
    model._pruned_per_layer = config.per_layer()
    return model


def load_pruned(path, dtype=None, device=None, *, config: PrunedConfig | None = None,
                attn_implementation: str | None = None, variant: str | None = None,
                state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Reload a `save_pruned` checkpoint as the base architecture's model, shrunk, in eval mode.
    A same-shape checkpoint (unstructured pruning writes one, as does a dense model) is read by
    stock `AutoModelForCausalLM.from_pretrained`, so one call loads whatever metricgp saved.

    dtype: None keeps torch's default (float32), "auto" the checkpoint's dtype, or a torch.dtype.
    variant: read `model.<variant>.safetensors`; state_dict: these weights instead of the files'.
    """
    path = Path(path)
    config = config if config is not None else _read_config(path)
    if not isinstance(config, PrunedConfig):

        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        extra |= {k: v for k, v in (("variant", variant), ("state_dict", state_dict)) if v is not None}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(dtype, config), **extra)
        return (model.to(_resolve_device(device)) if device is not None else model).eval()
    model = build_pruned(config, _resolve_dtype(dtype, config), attn_implementation)
    _load_strict(model, state_dict if state_dict is not None else _read_weights(path, variant))
    if (path / "generation_config.json").is_file():

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config._name_or_path = str(path)
    if device is not None:
        model.to(_resolve_device(device))
    return model.eval()


def _read_config(path: Path) -> PreTrainedConfig:
    register()
    return AutoConfig.from_pretrained(path)
