"""One forward pass gives every fidelity stage: prefix perplexity and KL equal separate passes,
and the evaluator runs only a promoted candidate's new windows."""

from __future__ import annotations

import math

import pytest
import torch

from metricgp.evaluate import FITNESSES
from metricgp.measure import DenseReference, WindowLosses, perplexity, window_losses


class _Bigram(torch.nn.Module):
    """A model whose next-token logits depend on the current token only."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _direct_kl(dense: torch.Tensor, pruned: torch.Tensor, windows: torch.Tensor) -> float:
    """Exact mean per-position KL(dense || pruned) (a top-k reference as wide as the vocabulary)."""
    p, q = dense[windows].log_softmax(-1), pruned[windows].log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_prefixes_of_one_pass_equal_separate_evaluations():
    windows = torch.randint(0, 11, (7, 9), generator=torch.Generator().manual_seed(1))
    model = _Bigram()
    dense = model.table.detach().clone()
    ref = DenseReference.build(model, windows[:3], k=11)
    with torch.no_grad():
        model.table.add_(0.3 * torch.randn(11, 11, generator=torch.Generator().manual_seed(2)))
    losses = window_losses(model, windows, batch_size=3, reference=ref)
    assert len(losses.kl) == 3
    for n in (1, 2, 5, 7):
        nll = torch.nn.functional.cross_entropy(model.table[windows[:n, :-1]].flatten(0, 1), windows[:n, 1:].flatten())
        assert losses.perplexity(n) == pytest.approx(math.exp(nll.item()), rel=1e-5)
        assert losses.perplexity(n) == pytest.approx(perplexity(model, windows[:n], 2), rel=1e-6)
    for n in (1, 3):
        assert losses.kl_to_dense(n) == pytest.approx(_direct_kl(dense, model.table.detach(), windows[:n]), rel=1e-4)
    assert losses.kl_to_dense(3) > 0
    with pytest.raises(ValueError):
        losses.kl_to_dense(4)
    # the tail of a pass that starts at window 2 continues the reference's indexing
    tail = window_losses(model, windows[2:], batch_size=2, reference=ref, first=2)
    joined = window_losses(model, windows[:2], reference=ref).extend(tail)
    for n in (3, 7):
        assert joined.perplexity(n) == pytest.approx(losses.perplexity(n), rel=1e-6)
    assert joined.kl_to_dense(3) == pytest.approx(losses.kl_to_dense(3), rel=1e-6)
    assert math.isinf(WindowLosses([1e6], [1]).perplexity(1))
    assert FITNESSES["kl"].measure(model, windows[:3], ref) == pytest.approx(losses.kl_to_dense(3), rel=1e-6)
