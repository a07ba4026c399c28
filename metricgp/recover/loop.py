"""The recovery training loop: a token budget, seeded batches, an lr schedule, clipping, checkpoints.

`recover(model, train_windows, tokens=N, ...)` fine-tunes in place for about N tokens and returns a
`RecoveryReport`. Steps = N // (batch_size * seqlen), at least 1; windows are visited in seeded random
order and cycled when the budget exceeds them. AdamW without weight decay, gradients clipped to
MAX_GRAD_NORM, lr from `SCHEDULES` (constant or cosine, after a linear warmup over `warmup` of the
steps). Adapter methods (lora without masks, group-lora: `Method.own_dtype`) leave the frozen weights
in their own dtype (bfloat16 on a GPU) and train float32 adapters; the others (full, masked lora)
train in float32 (parameters of another dtype are cast for the run and back after). Afterwards the
model has exactly its original modules, dtypes and `requires_grad` flags, in eval mode.

Curves and resume: at each token count of `checkpoints` the loop measures validation perplexity
(`val_windows`: validation or calibration text, never a test split), appends a point to the report's
curve, calls `on_checkpoint(tokens_done, model, point)` (a driver evaluates there) and, with a
`state_path`, writes the trainable parameters, the optimizer state, the step, the RNG state and the
curve so far. A run started again with the same state path, configuration and (re-pruned) model
continues after the last written checkpoint and ends exactly where an uninterrupted run ends.

Train windows come from `training_windows` (a calibration split: train, else validation; a test split
is refused), and a KD teacher was built on exactly these windows (`losses.build_teacher`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from metricgp.blocks import output_head
from metricgp.data import parse_data_ref, windows
from metricgp.errors import MetricGPError
from metricgp.fileio import atomic_path
from metricgp.measure import perplexity
from metricgp.models import find_blocks, prunable_layers
from metricgp.offload import offload_of, resident
from metricgp.recover.losses import Teacher, backward_loss, check_teacher, get_loss
from metricgp.recover.methods import RECOVERY_METHODS, AdapterShape, Masks, Method, Trainable, check_masks

MAX_GRAD_NORM = 1.0  # gradient clipping, so a too-large lr degrades rather than explodes


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# schedule name -> lr factor after warmup, of the fraction of post-warmup steps done (0 at its first step)
SCHEDULES: dict[str, Callable[[float], float]] = {"constant": _constant, "cosine": _cosine}


def lr_factor(schedule: str, step: int, steps: int, warmup_steps: int) -> float:
    """The lr multiplier of step `step` (0-based) of `steps`: linear warmup over the first
    `warmup_steps`, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return SCHEDULES[schedule]((step - warmup_steps) / max(1, steps - warmup_steps))


@dataclass
class RecoveryReport:
    method: str
    tokens: int  # tokens actually trained on: steps * batch_size * seqlen
    steps: int
    seconds: float
    trainable_params: int
    lr: float
    losses: list[float] = field(default_factory=list)  # training loss of every step
    val_ppl_before: float | None = None
    val_ppl_after: float | None = None
    loss: str = "ce"
    schedule: str = "constant"
    warmup_steps: int = 0
    train_seconds: float = 0.0  # the training steps alone (no validation, no checkpoints)
    tokens_per_second: float = 0.0  # tokens / train_seconds
    curve: list[dict] = field(default_factory=list)  # one point per checkpoint (see `recover`)
    masked_layers: int = 0  # layers whose sparsity pattern was kept
    resumed_from_step: int | None = None
    checkpointing: bool = False  # each block's activations recomputed in the backward pass

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RecoveryConfig:
    method: str
    tokens: int
    lr: float
    batch_size: int
    rank: int
    alpha: float
    target: tuple[str, ...] | None  # substrings of full module names; None: every block linear
    seed: int
    groups: int = 1  # group-lora: input-column groups per linear, each with its own adapter
    loss: str = "ce"
    schedule: str = "constant"
    warmup: float = 0.0  # fraction of the steps with a linear lr warmup

    def adapter_shape(self) -> AdapterShape:
        return AdapterShape(self.rank, self.alpha, self.groups, self.target)

    def identity(self) -> dict:
        """What a resumed run must share with the run that wrote the state."""
        return json.loads(json.dumps(asdict(self)))


CheckpointFn = Callable[[int, nn.Module, dict], None]


def training_windows(data: str, tokenizer, seqlen: int, tokens: int, seed: int) -> torch.Tensor:
    """Enough seeded random windows of `data`'s calibration split (train, else validation) for `tokens`.
    A test split is refused: training never reads one."""
    ref = parse_data_ref(data, "calibration")
    return windows(ref, tokenizer, "calibration", seqlen, -(-tokens // seqlen), seed)


def recover(
    model: nn.Module,
    train_windows: torch.Tensor,
    *,
    method: str = "lora",
    tokens: int,
    lr: float | None = None,
    batch_size: int = 1,
    rank: int = 8,
    alpha: float = 16,
    target: str | list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    val_windows: torch.Tensor | None = None,
    groups: int = 4,
    loss: str = "ce",
    teacher: Teacher | None = None,
    masks: Masks | None = None,
    schedule: str = "constant",
    warmup: float = 0.0,
    checkpoints: Sequence[int] = (),
    on_checkpoint: CheckpointFn | None = None,
    state_path: Path | None = None,
    methods: Mapping[str, Method] = RECOVERY_METHODS,
    checkpointing: bool = False,
) -> RecoveryReport:
    """Fine-tune `model` in place on `train_windows` (n, seqlen) for about `tokens` tokens.

    method: a key of `methods` ("lora", lr 1e-4; "full", lr 1e-5; the default lr when `lr` is None).
    target: train only block linears whose full name contains one of these substrings (e.g. "mlp");
    "full" without a target trains every block parameter, norms included. loss: "ce", "kd" or "ce+kd"
    (`losses.LOSSES`; kd needs `teacher`). masks: keep these sparsity patterns (`methods.sparse_masks`).
    val_windows: the report holds the perplexity on them before, at each checkpoint and after.
    checkpoints: token counts (each rounded down to whole steps, at least one step) at which a curve
    point {tokens, step, val_ppl, train_loss, train_seconds} is recorded, `on_checkpoint(tokens_done,
    model, point)` called and, with `state_path`, the resumable state written (see the module doc).
    checkpointing: keep only each decoder block's input for the backward pass and run the block again
    there (`checkpointed_blocks`): activations of one block instead of all, the same gradients, about
    a third more compute.
    """
    config = _config(train_windows, method, methods, tokens, lr, batch_size, rank, alpha, target, seed, groups,
                     loss, schedule, warmup)
    check_teacher(teacher, get_loss(loss), train_windows)
    if masks is not None:
        if not methods[method].keeps_masks:
            raise MetricGPError(f"recovery method '{method}' cannot keep a sparsity pattern (use lora or full)")
        check_masks(model, masks)
    per_step = batch_size * train_windows.shape[1]
    steps = max(1, tokens // per_step)
    marks = {min(steps, max(1, c // per_step)) for c in checkpoints}
    state = _load_state(state_path, config)
    t0 = time.perf_counter()
    before = state["val_ppl_before"] if state else _val_ppl(model, val_windows)
    report = RecoveryReport(method, steps * per_step, steps, 0.0, 0, config.lr, loss=loss, schedule=schedule,
                            warmup_steps=round(warmup * steps), masked_layers=len(masks or {}), val_ppl_before=before,
                            checkpointing=checkpointing)
    upcast = not (methods[method].own_dtype and masks is None)  # masked adapters add W + dW in W's dtype
    offload = offload_of(model)
    if offload is not None and upcast:
        raise MetricGPError("an offloaded model recovers with adapters in the weights' own dtype: --recover-method "
                            "lora on a structured model (a float32 copy of every block would not fit its host)")
    checkpointing = checkpointing or offload is not None  # else every block's weights stay live for the backward
    with torch.random.fork_rng(), _training_state(model, upcast):
        torch.manual_seed(seed)
        head = output_head(model)
        layers = _select(model, config.target)
        with methods[method].attach(model, layers, config.adapter_shape(), masks) as trainable, \
                (offload.on_device(trainable.params) if offload else contextlib.nullcontext()):
            report.trainable_params = sum(p.numel() for p in trainable.params)
            optimizer = torch.optim.AdamW(trainable.params, lr=config.lr, weight_decay=0.0)
            first = _restore(state, trainable, optimizer, report) if state else 0
            run = _Run(model, head, train_windows, teacher, config, trainable, optimizer, report)
            batches = _batches(len(train_windows), batch_size, steps, seed)
            for step in tqdm(range(first, steps), desc="recover", unit="step", initial=first, total=steps,
                             disable=not progress):
                with checkpointed_blocks(model) if checkpointing else contextlib.nullcontext():
                    run.step(step, batches[step])
                if step + 1 in marks:
                    run.checkpoint(step + 1, per_step, val_windows, on_checkpoint)
                    _save_state(state_path, config, step + 1, trainable, optimizer, report)
    report.tokens_per_second = report.tokens / report.train_seconds if report.train_seconds else 0.0
    report.seconds = time.perf_counter() - t0  # this call's (a resumed run's earlier calls are in train_seconds)
    report.val_ppl_after = _val_ppl(model, val_windows)
    return report


class _Run:
    """One training run's steps and checkpoints (the loop body of `recover`)."""

    def __init__(self, model: nn.Module, head, train_windows: torch.Tensor, teacher: Teacher | None,
                 config: RecoveryConfig, trainable: Trainable, optimizer, report: RecoveryReport):
        self.model, self.head, self.windows, self.teacher = model, head, train_windows, teacher
        self.config, self.trainable, self.optimizer, self.report = config, trainable, optimizer, report
        self.loss = get_loss(config.loss)
        self.device = trainable.params[0].device
        model.train()

    def step(self, step: int, idx: torch.Tensor) -> None:
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor(self.config.schedule, step, self.report.steps,
                                                     self.report.warmup_steps)
        ids = self.windows[idx].to(self.device)
        teacher = self.teacher.read(idx, self.device) if self.loss.needs_teacher else None
        self.optimizer.zero_grad(set_to_none=True)
        value = backward_loss(self.model, self.head, ids, self.loss, teacher)
        torch.nn.utils.clip_grad_norm_(self.trainable.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.trainable.after_step()
        self.report.losses.append(value)
        self.report.train_seconds += time.perf_counter() - t0

    def checkpoint(self, steps_done: int, per_step: int, val_windows: torch.Tensor | None,
                   on_checkpoint: CheckpointFn | None) -> None:
        self.model.eval()
        since = self.report.curve[-1]["step"] if self.report.curve else 0
        recent = self.report.losses[since:steps_done]
        point = {"tokens": steps_done * per_step, "step": steps_done, "val_ppl": _val_ppl(self.model, val_windows),
                 "train_loss": sum(recent) / max(1, len(recent)), "train_seconds": round(self.report.train_seconds, 3)}
        self.report.curve.append(point)
        if on_checkpoint is not None:
            on_checkpoint(point["tokens"], self.model, point)
        self.model.train()


def _config(windows: torch.Tensor, method: str, methods: Mapping[str, Method], tokens: int, lr: float | None,
            batch_size: int, rank: int, alpha: float, target: str | list[str] | None, seed: int, groups: int,
            loss: str, schedule: str, warmup: float) -> RecoveryConfig:
    if method not in methods:
        raise MetricGPError(f"unknown recovery method '{method}' (choose from {', '.join(methods)})")
    get_loss(loss)
    if schedule not in SCHEDULES:
        raise MetricGPError(f"unknown lr schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    if not 0.0 <= warmup < 1.0:
        raise MetricGPError(f"warmup must be a fraction of the steps in [0, 1), got {warmup}")
    if tokens < 1:
        raise MetricGPError(f"recovery tokens must be at least 1, got {tokens}")
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise MetricGPError(f"recovery needs (n, seqlen >= 2) train windows, got shape {tuple(windows.shape)}")
    if batch_size < 1 or rank < 1 or groups < 1:
        raise MetricGPError(f"batch_size, rank and groups must be at least 1, got {batch_size}, {rank} and {groups}")
    lr = methods[method].default_lr if lr is None else lr
    if not lr >= 0:
        raise MetricGPError(f"learning rate must be >= 0, got {lr}")
    targets = None if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return RecoveryConfig(method, tokens, lr, batch_size, rank, alpha, targets, seed, groups, loss, schedule, warmup)


def _select(model: nn.Module, target: tuple[str, ...] | None) -> dict[str, nn.Linear]:
    layers = prunable_layers(model)
    chosen = {n: m for n, m in layers.items() if target is None or any(t in n for t in target)}
    if not chosen:
        raise MetricGPError(f"recovery target {list(target or ())} matches no linear layer in the decoder blocks")
    return chosen


@contextmanager
def _training_state(model: nn.Module, upcast: bool = True):
    """Freeze everything (in float32 if `upcast`, else in its own dtype); afterwards restore dtypes and
    flags, and leave eval mode on."""
    saved = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        if upcast and p.is_floating_point():
            p.data = p.data.float()
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            dtype, flag = saved.get(n, (p.dtype, False))  # unknown names: adapters left by a failure
            p.data = p.data.to(dtype)
            p.grad = None
            p.requires_grad_(flag)
        model.eval()


@contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing of every decoder block, whatever the architecture: each block's forward is
    run under `torch.utils.checkpoint.checkpoint` (non-reentrant, so adapters inside a block whose input needs no
    gradient still get theirs), which keeps the block's inputs and recomputes its activations in the
    backward pass. The blocks' own forwards are put back afterwards."""
    _, blocks = find_blocks(model)
    own = [(block, block.__dict__.get("forward")) for block in blocks]  # a forward set on the instance (hooks)

    def visiting(block: nn.Module, forward: Callable) -> Callable:
        """The block's forward with the block on the device: the backward's recomputation calls the forward
        itself, not the module, so an offloaded block's hooks would not bring it there."""

        def run(*args, **kwargs):
            with resident(model, block):
                return forward(*args, **kwargs)

        return run

    for block in blocks:
        block.forward = functools.partial(checkpoint, visiting(block, block.forward), use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in own:
            if forward is None:
                del block.forward  # the class's forward again
            else:
                block.forward = forward


def _batches(n_windows: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Window indices per step: seeded permutations, concatenated as often as the budget needs."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    order = torch.cat([torch.randperm(n_windows, generator=gen) for _ in range(math.ceil(need / n_windows))])
    return list(order[:need].view(steps, batch_size))


def _val_ppl(model: nn.Module, windows: torch.Tensor | None) -> float | None:
    return None if windows is None else perplexity(model, windows)


def _load_state(path: Path | None, config: RecoveryConfig) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state["config"] != config.identity():
        raise MetricGPError(f"{path} holds the state of another recovery run ({state['config']}); remove it to "
                            "start this one afresh")
    return state


def _restore(state: dict, trainable: Trainable, optimizer, report: RecoveryReport) -> int:
    saved = state["params"]
    if [tuple(t.shape) for t in saved] != [tuple(p.shape) for p in trainable.params]:
        raise MetricGPError("the saved recovery state does not fit this model's trainable parameters")
    with torch.no_grad():
        for p, t in zip(trainable.params, saved, strict=True):
            p.copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    report.losses, report.curve = list(state["losses"]), list(state["curve"])
    report.train_seconds = state["train_seconds"]
    report.resumed_from_step = state["step"]
    return state["step"]


def _save_state(path: Path | None, config: RecoveryConfig, step: int, trainable: Trainable, optimizer,
                report: RecoveryReport) -> None:
    if path is None:
        return
    state = {"config": config.identity(), "step": step, "params": [p.detach().cpu() for p in trainable.params],
             "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "losses": report.losses,
             "curve": report.curve, "train_seconds": report.train_seconds, "val_ppl_before": report.val_ppl_before}
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)
