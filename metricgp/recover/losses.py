"""Recovery losses: cross-entropy on the next token, distillation from the dense model, or their sum.

KD is KL(dense || pruned) over next-token distributions, the dense side kept as its top-k log-probs
plus one tail bucket (the log of the probability mass outside the top k), as the search's KL fitness
keeps it (`metricgp.measure.DenseReference`): KL = sum_top p (log p - log q) + p_tail (log p_tail -
log q_tail), with q_tail the student's mass outside the teacher's top k, computed from its own
log-probs (never 1 - sum, which cancels). With k = vocabulary there is no tail bucket. A student
equal to the teacher has KL exactly 0: both sides are the same operations on the same logits.

Memory: the model is never held twice. The teacher is the dense model itself, run over the training
windows *before* pruning (`build_teacher`), its top-k written to disk a chunk of positions at a time
(memory-mapped .npy files, keyed by the dense weights' fingerprint, the windows and k) and read back
a batch at a time during training (`Teacher.read`). The student's log-softmax is made a chunk of
positions at a time, each chunk's loss back-propagated to the last block's output before the next
chunk is made (`backward_loss`), so a batch's full-vocabulary logits never exist at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from metricgp.blocks import OutputHead, last_block_output
from metricgp.errors import MetricGPError
from metricgp.fileio import atomic_path
from metricgp.measure import KL_TOPK, logit_chunks
from metricgp.models import cache_root, weights_fingerprint

KD_TOPK = KL_TOPK  # the dense side as the KL fitness keeps it
TEACHER_VERSION = 1  # bump when what a teacher cache holds changes
IGNORE = -100  # target of a position without a next token


@dataclass(frozen=True)
class Loss:
    """Weights of the two terms (each a mean per position): ce + kd = their sum."""

    ce: float
    kd: float

    @property
    def needs_teacher(self) -> bool:
        return self.kd > 0


LOSSES: dict[str, Loss] = {"ce": Loss(1.0, 0.0), "kd": Loss(0.0, 1.0), "ce+kd": Loss(1.0, 1.0)}


def get_loss(name: str) -> Loss:
    if name not in LOSSES:
        raise MetricGPError(f"unknown recovery loss '{name}' (choose from {', '.join(LOSSES)})")
    return LOSSES[name]


def windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def tail_logp(logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `top_idx`, per position, from full log-probs."""
    return logp.scatter(-1, top_idx, float("-inf")).logsumexp(-1)


def kl_per_position(student_logp: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor,
                    tail: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each position from the student's full log-probs (positions, vocab) and
    the teacher's top-k indices and log-probs (positions, k) and tail log-mass (positions,)."""
    p = top_logp.exp()
    kl = (p * (top_logp - student_logp.gather(-1, top_idx))).sum(-1)
    if top_idx.shape[-1] >= student_logp.shape[-1]:  # the whole vocabulary: no tail bucket
        return kl
    p_tail = tail.exp()
    return kl + p_tail * (tail - tail_logp(student_logp, top_idx))


@dataclass(frozen=True)
class Teacher:
    """The dense model's top-k next-token log-probs on the training windows, on disk (see the module doc)."""

    path: Path
    k: int
    windows: str  # windows_digest of the windows it was built on

    def read(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top indices, top log-probs, tail log-mass) of windows `rows`, flattened to (rows * seqlen, ...)."""
        index = rows.cpu().numpy()
        out = []
        for name in ("top_idx", "top_logp", "tail"):
            array = torch.from_numpy(np.load(self.path / f"{name}.npy", mmap_mode="r")[index])  # reads those rows
            out.append(array.reshape(-1, *array.shape[2:]).to(device))
        return out[0].long(), out[1], out[2]


def teacher_key(fingerprint: str, windows: torch.Tensor, k: int, dtype: torch.dtype) -> str:
    payload = json.dumps({"v": TEACHER_VERSION, "model": fingerprint, "windows": windows_digest(windows),
                          "shape": list(windows.shape), "k": k, "dtype": str(dtype)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@torch.no_grad()
def build_teacher(model: nn.Module, windows: torch.Tensor, *, k: int = KD_TOPK, fingerprint: str | None = None,
                  batch_size: int = 4, progress: bool = True, cache_dir: Path | None = None) -> Teacher:
    """The dense `model`'s top-k on `windows`, from the disk cache or computed now (call before pruning:
    `fingerprint` names the dense weights; default: computed from the model)."""
    fingerprint = fingerprint or weights_fingerprint(model)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    k = min(k, vocab) if vocab else k
    dtype = next(model.parameters()).dtype
    path = (cache_dir or cache_root() / "teacher") / teacher_key(fingerprint, windows, k, dtype)
    teacher = Teacher(path, k, windows_digest(windows))
    if (path / "meta.json").is_file():
        return teacher
    n, seqlen = windows.shape
    with atomic_path(path) as tmp:
        tmp.mkdir()
        layout = {"top_idx": (np.int32, (n, seqlen, k)), "top_logp": (np.float32, (n, seqlen, k)),
                  "tail": (np.float32, (n, seqlen))}
        arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dt, shape=shape)
                  for name, (dt, shape) in layout.items()}
        for start in tqdm(range(0, n, batch_size), desc="teacher top-k", unit="batch", leave=False,
                          disable=not progress):
            for row, first, logits in logit_chunks(model, windows[start : start + batch_size]):
                logp = logits.log_softmax(-1)
                top = logp.topk(k, dim=-1)
                where = (start + row, slice(first, first + len(logits)))
                arrays["top_idx"][where] = top.indices.int().cpu().numpy()
                arrays["top_logp"][where] = top.values.cpu().numpy()
                arrays["tail"][where] = tail_logp(logp, top.indices).cpu().numpy()
        for array in arrays.values():
            array.flush()
        del arrays
        (tmp / "meta.json").write_text(json.dumps({"model": fingerprint, "windows": teacher.windows,
                                                   "shape": [n, seqlen], "k": k, "dtype": str(dtype)}))
    return teacher


def _targets(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of every position, flattened; the last position of a window has none."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: tuple | None, loss: Loss,
                n_ce: int, n_kd: int) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    total = logits.new_zeros(())
    if loss.ce:
        total = total + loss.ce * F.nll_loss(logp, targets, ignore_index=IGNORE, reduction="sum") / n_ce
    if loss.kd:
        total = total + loss.kd * kl_per_position(logp, *teacher).sum() / n_kd
    return total


def backward_loss(model: nn.Module, head: OutputHead | None, ids: torch.Tensor, loss: Loss,
                  teacher: tuple | None = None) -> float:
    """Forward the batch `ids`, back-propagate `loss` (mean per position of each term) and return its
    value. `teacher`: the batch's (top indices, top log-probs, tail) flattened over positions. With an
    output head the blocks run once and the head a chunk of positions at a time; without one
    (`blocks.output_head` found none) the model's own logits are used whole."""
    b, t = ids.shape
    targets = _targets(ids)
    n_ce, n_kd = b * (t - 1), b * t
    if head is None:
        logits = model(input_ids=ids, use_cache=False).logits.reshape(n_kd, -1)
        value = _chunk_loss(logits, targets, teacher, loss, n_ce, n_kd)
        value.backward()
        return value.detach().item()
    hidden = last_block_output(model, ids)
    flat = hidden.detach().reshape(n_kd, -1).requires_grad_(True)
    step, total = head.positions_per_chunk, 0.0
    for first in range(0, n_kd, step):
        part = slice(first, first + step)
        chunk_teacher = None if teacher is None else tuple(x[part] for x in teacher)
        value = _chunk_loss(head(flat[part]), targets[part], chunk_teacher, loss, n_ce, n_kd)
        value.backward()
        total += value.detach().item()
    hidden.backward(flat.grad.view_as(hidden))
    return total


def check_teacher(teacher: Teacher | None, loss: Loss, windows: torch.Tensor) -> None:
    if loss.needs_teacher and teacher is None:
        raise MetricGPError("a distillation loss needs the dense model's top-k (build_teacher before pruning)")
    if teacher is not None and teacher.windows != windows_digest(windows):
        raise MetricGPError("the teacher was built on other windows than the training windows")
