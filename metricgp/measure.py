"""Measurement: perplexity, per-window losses and KL to the dense model of any causal LM.

Pure functions of a model and token windows (no session, no pruning): the evaluators, the
commands and the experiment drivers all measure through these.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from metricgp.blocks import OutputHead, last_block_output, output_head

KL_TOPK = 256  # dense distribution kept as top-k log-probs + the tail mass (memory: EvoPress users)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.float()


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OutputHead or None, found once


def _head(model: nn.Module) -> OutputHead | None:
    if model not in _HEADS:
        _HEADS[model] = output_head(model)
    return _HEADS[model]


@torch.no_grad()
def logit_chunks(model: nn.Module, ids: torch.Tensor):
    """Yield (row, first position, float32 logits of that row's positions first, first+1, ...) over the
    batch `ids`, at most LOGIT_CHUNK_ELEMENTS logits at a time: the blocks run once on the batch and
    the output head a chunk of positions at a time. A model whose head is not norm -> LM head
    (-> soft-capping) gives its whole logits, row by row."""
    head = _head(model)
    if head is None:
        logits = _logits(model, ids)
        for row in range(len(ids)):
            yield row, 0, logits[row]
        return
    hidden = last_block_output(model, ids.to(head.lm_head.weight.device))
    step = head.positions_per_chunk
    for row in range(len(ids)):
        for first in range(0, hidden.shape[1], step):
            yield row, first, head(hidden[row, first : first + step])


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over all predicted tokens of the windows."""
    losses = window_losses(model, windows, batch_size, progress=progress)
    return losses.perplexity(len(windows))


def _exp_or_inf(mean: float) -> float:
    # exp overflows a Python float beyond ~709.78: such a model is as bad as a non-finite one
    return math.exp(mean) if math.isfinite(mean) and mean < 709.0 else math.inf


@dataclass(frozen=True)
class WindowLosses:
    """Per-window sums from one forward pass, so every prefix of the windows (each fidelity
    stage evaluates the first n) gets its perplexity and KL without another pass."""

    nll: list[float]  # summed next-token NLL of each window
    tokens: list[int]  # predicted tokens of each window
    kl: list[float] = field(default_factory=list)  # summed KL(dense || pruned), first len(kl) windows
    kl_tokens: list[int] = field(default_factory=list)  # positions KL covers (every position, the last too)

    def perplexity(self, n: int) -> float:
        return _exp_or_inf(sum(self.nll[:n]) / sum(self.tokens[:n]))

    def extend(self, more: WindowLosses) -> WindowLosses:
        """These windows followed by `more`'s."""
        if len(self.kl) != len(self.nll) and more.kl:
            raise ValueError("cannot append KL windows after windows measured without KL")
        return WindowLosses(self.nll + more.nll, self.tokens + more.tokens, self.kl + more.kl,
                            self.kl_tokens + more.kl_tokens)

    def kl_to_dense(self, n: int) -> float:
        if n > len(self.kl):
            raise ValueError(f"KL was measured on {len(self.kl)} windows, not {n}")
        return sum(self.kl[:n]) / sum(self.kl_tokens[:n])


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  reference: DenseReference | None = None, progress: bool = False, first: int = 0) -> WindowLosses:
    """Next-token NLL of each window and, for the windows `reference` covers, KL to dense.
    `first`: the index of windows[0] among the windows `reference` was built on."""
    nll, tokens, kl, kl_tokens = [], [], [], []
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", leave=False, disable=not progress):
        ids = windows[start : start + batch_size]
        rows = len(ids)
        with_kl = [reference is not None and first + start + row < len(reference.top_logp) for row in range(rows)]
        window_nll, window_kl = [0.0] * rows, [0.0] * rows
        for row, pos, logits in logit_chunks(model, ids):
            target = ids[row, pos + 1 : pos + 1 + len(logits)].to(logits.device)  # the last position has none
            if len(target):
                window_nll[row] += float(F.cross_entropy(logits[: len(target)], target, reduction="sum"))
            if with_kl[row]:
                window_kl[row] += float(reference.window_kl(logits, first + start + row, pos).sum())
        nll.extend(window_nll)
        tokens.extend([ids.shape[1] - 1] * rows)
        kl.extend(v for v, on in zip(window_kl, with_kl, strict=True) if on)
        kl_tokens.extend(ids.shape[1] for on in with_kl if on)
    return WindowLosses(nll, tokens, kl, kl_tokens)


@dataclass
class DenseReference:
    """Top-k next-token log-probs of the dense model, computed once, for KL fitness."""

    top_logp: torch.Tensor  # (n, seqlen, k)
    top_idx: torch.Tensor  # (n, seqlen, k)

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, windows: torch.Tensor, k: int = KL_TOPK) -> DenseReference:
        logps, idxs = [], []
        for window in windows:
            chunks = [logits.log_softmax(-1) for _, _, logits in logit_chunks(model, window.unsqueeze(0))]
            tops = [logp.topk(min(k, logp.shape[-1]), dim=-1) for logp in chunks]  # small vocabulary: all of it
            logps.append(torch.cat([top.values.cpu() for top in tops]))
            idxs.append(torch.cat([top.indices.cpu() for top in tops]))
        return cls(torch.stack(logps), torch.stack(idxs))

    def window_kl(self, logits: torch.Tensor, i: int, first: int = 0) -> torch.Tensor:
        """Per-token KL(dense || pruned) of window `i` from the pruned model's (positions, vocab) logits
        of positions first, first+1, ..."""
        q_logp = logits.log_softmax(-1)
        positions = slice(first, first + len(logits))
        p_logp = self.top_logp[i, positions].to(q_logp.device)
        q_top = q_logp.gather(-1, self.top_idx[i, positions].to(q_logp.device))
        p = p_logp.exp()
        kl = (p * (p_logp - q_top)).sum(-1)
        p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
        q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
        return kl + p_tail * (p_tail.log() - q_tail.log())
