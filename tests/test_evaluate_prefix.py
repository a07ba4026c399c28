"""One forward pass gives every fidelity stage: prefix perplexity and KL equal separate passes."""

from __future__ import annotations

import math

import pytest
import torch

from metricgp.evaluate import DenseReference, kl_to_dense, perplexity, window_losses


class _Bigram(torch.nn.Module):
    """A model whose next-token logits depend on the current token only."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_prefixes_of_one_pass_equal_separate_evaluations():
    windows = torch.randint(0, 11, (7, 9), generator=torch.Generator().manual_seed(1))
    model = _Bigram()
    ref = DenseReference.build(model, windows[:3], k=4)
    with torch.no_grad():
        model.table.add_(0.3 * torch.randn(11, 11, generator=torch.Generator().manual_seed(2)))
    losses = window_losses(model, windows, batch_size=3, reference=ref)
    assert len(losses.kl) == 3
    for n in (1, 2, 5, 7):
        assert losses.perplexity(n) == pytest.approx(perplexity(model, windows[:n], 2), rel=1e-6)
    for n in (1, 3):
        assert losses.kl_to_dense(n) == pytest.approx(kl_to_dense(model, windows[:n], ref), rel=1e-6)
    assert losses.kl_to_dense(3) > 0
    with pytest.raises(ValueError):
        losses.kl_to_dense(4)
    assert math.isinf(type(losses)([1e6], [1]).perplexity(1))
