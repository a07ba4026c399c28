"""Random-weight Llama models built from a block shape (no download) and every phase of the pipeline
run on them through the library's public functions: what `make bench-scale` (experiments/scale.py:
peak resident memory of one phase per fresh process, against depth) and `make gpu-check`
(experiments/gpu_check.py: every phase on one GPU, its peak device memory and seconds) measure.

A phase has a `prepare` step that is not measured (the session it runs in: the model, statistics,
the dense weights read back from a saved checkpoint; or a pruned model for recovery) and a `run`
step that is. A phase's peak is the process's peak while `run` runs, so it includes what `prepare`
left resident, as it would in the command the phase stands for; a command that computes its
statistics first peaks at the larger of the statistics phase and its own.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from metricgp.darwin.config import DarwinConfig, prepare
from metricgp.darwin.fitness import Candidate, LevelEvaluator
from metricgp.darwin.search import LevelSearch
from metricgp.evaluate import EvaluatorSpec, PruningSetup
from metricgp.expr import compile_metric, resolve_metric, to_functional
from metricgp.expr.ops import leaves_from
from metricgp.fileio import atomic_path
from metricgp.measure import perplexity, window_losses
from metricgp.models import CheckpointTensors, cache_root, find_blocks, prunable_layers
from metricgp.offload import BlockOffload, compute_device
from metricgp.prune.engine import DenseWeights, prune_oneshot
from metricgp.prune.patterns import parse_pattern
from metricgp.stats import cached_stats, compute_stats, save_stats, stats_cache_path, stats_key
from metricgp.structured.evaluator import StructuredSpec
from metricgp.structured.evaluator import prune as prune_structured
from metricgp.structured.recover import recover


@dataclass(frozen=True)
class BlockShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int  # the benchmarks' vocabulary (the memory model rescales embedding bytes to a config's own)

    def config(self, layers: int, vocab: int | None = None) -> transformers.LlamaConfig:
        return transformers.LlamaConfig(vocab_size=vocab or self.vocab, hidden_size=self.hidden,
                                        intermediate_size=self.intermediate, num_hidden_layers=layers,
                                        num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                                        max_position_embeddings=4096, use_cache=False)


# Llama blocks of each shape. 8b: Llama-3.1-8B's block; 14b: Qwen2.5-14B's (without its q/k/v biases,
# 0.003% of a block); 70b: Llama-3.1-70B's. Their real vocabularies (128K-152K) would add a constant
# 1-2 GB of embeddings to every row, so the benchmarks use 32K and the memory model rescales.
SHAPES: dict[str, BlockShape] = {
    "8b": BlockShape(4096, 14336, 32, 8, 32768),
    "14b": BlockShape(5120, 13824, 40, 8, 32768),
    "70b": BlockShape(8192, 28672, 64, 8, 32768),
    "small": BlockShape(576, 1536, 9, 3, 32768),  # SmolLM2-135M's block
    "mini": BlockShape(512, 2048, 8, 2, 2048),
    "test": BlockShape(256, 1024, 4, 2, 512),  # memory tests: a block (3.9 MB in float32) above RSS noise
    "tiny": BlockShape(64, 128, 4, 2, 256),  # smoke tests
}

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
SPARSITY, KEEP = 0.5, 0.7


def tensor_bytes(stats: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for per in stats.values() for t in per.values())


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Session:
    """A random-weight model of `layers` blocks of `shape` with random calibration windows, and what
    the phases build on it (statistics cached under `$METRICGP_CACHE`, so the phases of one benchmark
    compute them once)."""

    shape: str
    layers: int
    dtype: str = "bfloat16"
    device: str = "cpu"
    windows: int = 2
    seqlen: int = 128
    vocab: int | None = None  # None: the shape's
    offload: bool = False  # decoder blocks on the host, one at a time on `device` (metricgp.offload)
    model: nn.Module = field(init=False)
    calib: torch.Tensor = field(init=False)
    held: dict[str, Any] = field(default_factory=dict, init=False)  # what prepare made; host bytes are read here

    def __post_init__(self) -> None:
        shape = SHAPES[self.shape]
        torch.manual_seed(0)
        with torch.device(self.device):
            self.model = transformers.AutoModelForCausalLM.from_config(
                shape.config(self.layers, self.vocab), dtype=DTYPES[self.dtype]).eval()
        if self.offload:
            BlockOffload.install(self.model, find_blocks(self.model)[1], self.device)
        vocab = self.model.config.vocab_size
        self.calib = torch.randint(0, vocab, (self.windows, self.seqlen), generator=torch.Generator().manual_seed(0))
        self.fingerprint = f"random-{self.shape}-x{self.layers}-v{vocab}-{self.dtype}"

    @property
    def spec(self) -> EvaluatorSpec:
        return EvaluatorSpec(model=self.fingerprint, dtype=self.dtype, device=self.device, calib="c4",
                             n_calib=self.windows, seqlen=self.seqlen, batch_size=self.windows, offload=self.offload)

    def _key(self, grads: bool) -> str:
        return stats_key(self.fingerprint, "random", self.windows, self.seqlen, 0, grads)

    def statistics(self, grads: bool) -> dict[str, dict[str, torch.Tensor]]:
        """The cached statistics (computed and cached when missing); without grads, a cached gradient
        pass is read and its gradient leaves dropped, so a phase holds only what it asked for."""
        layers = prunable_layers(self.model)
        full = self.held.get("statistics")  # what the statistics phase of this process made
        if full is None and not grads and stats_cache_path(self._key(True)).is_file():
            full, _ = cached_stats(self.model, layers, self.calib, self._key(True), grads=True)
        if full is None:
            return cached_stats(self.model, layers, self.calib, self._key(grads), grads=grads)[0]
        gradient = set() if grads else set(leaves_from("gradients"))
        return {n: {k: t for k, t in per.items() if k not in gradient} for n, per in full.items()}

    def checkpoint(self) -> CheckpointTensors:
        """The model saved as a Hugging Face checkpoint (once, under the cache), as a command's model is
        loaded from one: the session restores its dense weights from it, as a command's does."""
        path = cache_root() / "random-models" / self.fingerprint
        if not (path / "config.json").is_file():
            with atomic_path(path) as tmp:
                self.model.save_pretrained(tmp)
        return CheckpointTensors(path)

    def setup(self, grads: bool = False) -> PruningSetup:
        """The session every command builds: model, statistics, dense weights (read back from the
        checkpoint), calibration windows."""
        if "setup" not in self.held:
            layers = prunable_layers(self.model)
            stats = self.statistics(grads)
            self.held["stats"] = stats
            dense = DenseWeights(layers, self.checkpoint())
            self.held["setup"] = PruningSetup(self.model, None, layers, dense, stats, self.spec,
                                              self.fingerprint, True, calib=self.calib)
        return self.held["setup"]

    def host_bytes(self) -> int:
        """Bytes held where the library keeps them on the host even beside a GPU (the statistics)."""
        return tensor_bytes(self.held.get("stats", {}))

    def offloaded_bytes(self) -> int:
        """The decoder blocks' bytes kept on the host under offloading (0 without it)."""
        return param_bytes(find_blocks(self.model)[1]) if self.offload else 0


def _wanda():
    return resolve_metric("wanda")


# ------------------------------------------------------------------ the phases: (prepare, run)

def _statistics(s: Session, _: Any) -> int:
    """The statistics pass with every finished statistic handed off as it is made, as each block's leave
    the device for the host: beside a GPU they stay in host memory (not the device peak); on the host
    itself they go to disk, so the resident peak is the pass's own. Returns their bytes."""
    on_disk = torch.device(s.device).type == "cpu"
    made = s.held["made"] = Path(tempfile.mkdtemp(prefix="metricgp-stats-")) if on_disk else {}
    written: list[int] = []

    def sink(layer: str, leaf: str, t: torch.Tensor) -> None:
        if on_disk:
            save_file({"t": t.contiguous()}, str(made / f"{len(written)}|{layer}|{leaf}.safetensors"))
        else:
            made.setdefault(layer, {})[leaf] = t
        written.append(t.numel() * t.element_size())

    compute_stats(s.model, prunable_layers(s.model), s.calib, grads=True, sink=sink)
    return sum(written)


def _keep_statistics(s: Session, _: Any) -> None:
    """After the measurement: what the pass made, for the later phases (the statistics cache on disk, or
    kept in memory beside a GPU)."""
    made = s.held.pop("made")
    if isinstance(made, dict):
        s.held["statistics"] = made
        return
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for path in made.iterdir():
        _, layer, leaf = path.name.removesuffix(".safetensors").split("|")
        stats.setdefault(layer, {})[leaf] = load_file(str(path))["t"]
    save_stats(stats, stats_cache_path(s._key(True)))
    shutil.rmtree(made)


SEARCH_METRICS = ("wanda", "magnitude", "gblm", "ria", "pruner-zero")


def _search_evaluations(s: Session, _: Any) -> None:
    """Five candidates as the search scores them: one-shot masks from the cached W/X/G, the validation
    loss of the windows, the dense weights restored."""
    setup = s.setup(grads=True)
    pattern = parse_pattern("unstructured", SPARSITY)
    for name in SEARCH_METRICS:
        prune_oneshot(setup.dense, setup.stats, compile_metric(resolve_metric(name)), pattern, compute_device(s.model))
        try:
            window_losses(setup.model, s.calib, batch_size=s.windows)
        finally:
            setup.dense.restore()


def _apply(mode: str) -> Callable[[Session, Any], None]:
    def run(s: Session, _: Any) -> None:
        setup = s.setup()
        setup.prune(_wanda(), parse_pattern("unstructured", SPARSITY), mode)
        perplexity(setup.model, s.calib, batch_size=s.windows)

    return run


def _structured_refit(s: Session, _: Any) -> None:
    """`apply --structured --keep 0.7 --refit`: scores, plan, output-projection Hessians, and the session's
    model shrunk in place block by block, its dense copy released (as the command does; `_dense_again`
    builds the dense model again after the measurement)."""
    model, _report = prune_structured(s.setup(), _wanda(), StructuredSpec(keep=KEEP, refit=True), in_place=True)
    perplexity(model, s.calib, batch_size=s.windows)


def _dense_again(s: Session, _: Any) -> None:
    """After a phase that shrank the session's model in place (not measured): the dense model again, from
    the same seed (the same weights), and a session on it for the phases after it in this process."""
    for key in ("setup", "stats"):
        s.held.pop(key, None)
    s.model = None
    gc.collect()  # the shrunk model and its session sit in reference cycles: gone before the next phase
    s.__post_init__()


def _darwin_generation(s: Session, _: Any) -> None:
    """The level database, the dense reference, generation 0 and one generation of 4 offspring."""
    setup = s.setup()
    config = DarwinConfig(spec=s.spec.to_dict(), metric=to_functional(_wanda()), keep=0.6, offspring=4,
                          generations=1, stages=({"survivors": 2, "windows": 1, "train_tokens": 0},
                                                 {"survivors": 1, "windows": s.windows, "train_tokens": 0}),
                          speed=False).validate()
    prep = prepare(config, setup=setup)
    evaluator = LevelEvaluator(config.recipe(prep.database), setup, fitness_windows=s.calib)
    stages = config.schedule()

    def score(genomes, k):
        return [evaluator.evaluate(Candidate(g), stages[k].windows).fitness for g in genomes]

    search = LevelSearch(prep.space, config.search_config(), score, prep.start, prep.prior)
    search.initialize()
    search.step()
    evaluator.masks.reset()


def _pruned_copy(s: Session) -> nn.Module:
    """`apply --structured --keep 0.7`: the session's model shrunk in place, its dense weights released."""
    model = prune_structured(s.setup(), _wanda(), StructuredSpec(keep=KEEP), in_place=True)[0]
    gc.collect()  # what the prune left in reference cycles (its dense linears), as a command's run would free
    return model


def _recovery(s: Session, pruned: nn.Module) -> None:
    """`--recover-tokens`: two LoRA steps on the 70%-kept model, frozen weights in their own dtype and
    float32 adapters. As in the command, the dense model is gone by then: it was shrunk in place (what
    recovery needs of it, the KD teacher's top-k, is taken before pruning)."""
    recover(pruned, s.calib, method="lora", tokens=2 * s.seqlen, batch_size=1, progress=False)


@dataclass(frozen=True)
class Phase:
    run: Callable[[Session, Any], int | None]  # the bytes it leaves on the host, when not the session's
    prepare: Callable[[Session], Any] = lambda s: None
    after: Callable[[Session, Any], None] = lambda s, state: None  # once measured (not measured)
    doc: str = ""


PHASES: dict[str, Phase] = {
    "model": Phase(lambda s, _: None, doc="the model alone"),
    "statistics": Phase(_statistics, after=_keep_statistics,
                        doc="W/X/Hinv/G statistics (each block's handed to the host as made)"),
    "search-evaluation": Phase(_search_evaluations, lambda s: s.setup(grads=True),
                               doc="five metric-search candidates (session with G)"),
    "apply-oneshot": Phase(_apply("oneshot"), lambda s: s.setup(), doc="apply --mode oneshot + perplexity"),
    "sequential": Phase(_apply("sequential"), lambda s: s.setup(), doc="apply --mode sequential + perplexity"),
    "reconstruct": Phase(_apply("reconstruct"), lambda s: s.setup(), doc="apply --mode reconstruct + perplexity"),
    "structured-refit": Phase(_structured_refit, lambda s: s.setup(), after=_dense_again,
                              doc="apply --structured --keep 0.7 --refit + perplexity (shrunk in place)"),
    "darwin-generation": Phase(_darwin_generation, lambda s: s.setup(), doc="darwin: database, generation 0 and 1"),
    "recovery": Phase(_recovery, _pruned_copy, after=_dense_again,
                      doc="two LoRA steps on the 70%-kept model (shrunk in place; no dense model)"),
}


class PeakMeter:
    """The peak memory of what runs between `reset()` and `peak()`: the GPU's allocated bytes on CUDA,
    the process's resident set on the host (Linux VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field_name}")

    def resident(self) -> int:
        return self._status("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets the peak resident set to the current one (Linux >= 4.0)
        except OSError as err:
            raise RuntimeError(f"cannot reset the peak resident set here (Linux only): {err}") from err

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")


def measure_phase(name: str, session: Session, meter: PeakMeter) -> dict[str, Any]:
    """Prepare `name`'s phase on `session`, then run it between a reset and a read of the meter. `held_bytes`:
    host-side bytes (statistics) resident during the run, so inside a CPU peak; `host_bytes`: what the host
    holds once the phase is done."""
    phase = PHASES[name]
    state = phase.prepare(session)
    held = session.host_bytes()
    meter.reset()
    t0 = time.perf_counter()
    made = phase.run(session, state)
    seconds = time.perf_counter() - t0
    peak = meter.peak()
    offloaded = session.offloaded_bytes()  # the blocks as the phase left them (shrunk ones count as shrunk)
    phase.after(session, state)
    blocks = session.model.model.layers
    return {"phase": name, "seconds": round(seconds, 2), "peak_bytes": peak, "held_bytes": held,
            "host_bytes": (held if made is None else made) + offloaded, "offloaded_bytes": offloaded,
            "offload": session.offload,
            "model_bytes": param_bytes(session.model), "block_bytes": param_bytes(blocks[0]),
            "threads": torch.get_num_threads()}
