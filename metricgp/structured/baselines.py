"""Statistics the non-metric baselines need, each one forward pass over calibration windows.

- FLAP (An et al. 2024): fluctuation of an output projection's input channel j,
  var(x_j) * ||W[:, j]||^2, standardised per layer, ranked globally, with bias compensation
  b += W[:, removed] @ mean(x[removed]) so the removed channels' mean contribution stays.
  var(x_j) = X_j - mean(x_j)^2 uses the cached X (mean square); the mean is the extra pass.
- ShortGPT (Men et al. 2024): block influence BI_i = 1 - mean_t cos(h_in, h_out) per block;
  the blocks that change their input least are removed.
"""

from __future__ import annotations

import torch
from torch import nn

from metricgp.models import find_blocks
from metricgp.stats import layer_input_hooks


@torch.no_grad()
def input_means(model: nn.Module, layers: dict[str, nn.Linear], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean input activation per input feature of each layer, shape (1, in)."""
    sums = {n: torch.zeros(m.in_features) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def consume(name: str, x: torch.Tensor) -> None:
        if sums[name].device != x.device:  # the sums follow the activations (an offloaded model's weights
            sums[name] = sums[name].to(x.device)  # are on the host, its activations on the device)
        sums[name] += x.sum(dim=0)
        counts[name] += x.shape[0]

    device = next(model.parameters()).device
    with layer_input_hooks(layers, consume):
        for window in calib:
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    return {n: (sums[n] / max(counts[n], 1)).unsqueeze(0).cpu() for n in layers}


def flap_scores(weight: torch.Tensor, x_sq: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """Element scores whose column sums are FLAP's fluctuation var(x_j) * ||W[:, j]||^2."""
    variance = (x_sq - x_mean.square()).clamp_min(0)
    return weight.float().square() * variance.to(weight.device)


def compensate_bias(lin: nn.Linear, removed_cols: torch.Tensor, x_mean: torch.Tensor) -> nn.Linear:
    """A copy of `lin` with a bias absorbing the mean contribution of the columns about to go."""
    w = lin.weight.detach()
    shift = w[:, removed_cols] @ x_mean.reshape(-1)[removed_cols].to(w)
    new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(shift + (lin.bias.detach() if lin.bias is not None else 0))
    return new


@torch.no_grad()
def block_influence(model: nn.Module, calib: torch.Tensor) -> list[float]:
    """ShortGPT's BI per decoder block: 1 - mean cosine similarity of its input and output."""
    _, blocks = find_blocks(model)
    sums = [0.0] * len(blocks)
    count = [0] * len(blocks)

    def hook_for(i: int):
        def hook(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            count[i] += cos.numel()

        return hook

    handles = [b.register_forward_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        for window in calib:
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, count, strict=True)]
