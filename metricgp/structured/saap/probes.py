"""What removing a structure really costs: the measured loss increase of sampled probes, which SAAP's
fusion holds every estimator against.

A probe is a few structures of one module: one query head of an attention module, or a run of MLP
channels with about as many weights as that head (so that probes of both kinds remove comparable
amounts). Per module `per_module` probes are drawn (seeded). For probe p, with its coupled rows and
columns zeroed (`metricgp.structured.groups.Slice`: the same coupling that shrinking removes),

    Delta_p = mean NLL on the probe windows  -  the dense model's mean NLL on them
    O_p     = Delta_p / c_p                  the measured loss increase per weight removed

The probe windows are fresh draws from the calibration text (its train split, seed + PROBE_SEED:
neither the calibration sample the estimators were scored on nor recovery's seed + 1), so the
estimators are checked on text they did not score, of the same kind, and never on a test split.
One forward pass per probe; the result is cached on disk under the statistics' identity, the
probe layout and the windows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from metricgp.data import parse_data_ref, windows
from metricgp.fileio import atomic_path
from metricgp.measure import window_losses
from metricgp.models import cache_root
from metricgp.structured.groups import Module

PROBES_VERSION = 1  # bump when a probe's loss changes meaning, to invalidate old caches
PROBE_SEED = 7919  # offset of the probe windows' seed from the calibration seed


@dataclass(frozen=True)
class Probe:
    module: str
    members: tuple[int, ...]  # element indices (query heads or channels) of `module`
    layout: tuple[int, ...]  # the same structures as indices into the estimators' (.., N) layout


def _members_per_probe(module: Module, modules_of_block: list[Module], linears: dict[str, nn.Linear]) -> int:
    """One head; for an MLP the channel count whose weights match one head of the same block."""
    if module.kind == "attention":
        return 1
    heads = [m for m in modules_of_block if m.kind == "attention"]
    head = heads[0].element_params(linears) if heads else module.element_params(linears)
    return max(1, min(module.n_elements, round(head / module.element_params(linears))))


def choose_probes(modules: list[Module], linears: dict[str, nn.Linear], per_module: int = 1,
                  seed: int = 0) -> list[Probe]:
    """`per_module` disjoint probes in every module, drawn with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    probes, start = [], 0
    for m in modules:
        size = _members_per_probe(m, [o for o in modules if o.block == m.block], linears)
        order = torch.randperm(m.n_elements, generator=gen).tolist()
        for i in range(min(per_module, m.n_elements // size)):
            members = tuple(sorted(order[i * size:(i + 1) * size]))
            probes.append(Probe(m.name, members, tuple(start + j for j in members)))
        start += m.n_elements + m.n_kv
    return probes


def _owned(module: Module, members: tuple[int, ...], linears: dict[str, nn.Linear]) -> list[tuple]:
    """(tensor, axis, indices) of every weight and bias slice that the members' structures own."""
    views = []
    for s in module.slices:
        lin = linears[s.linear]
        idx = torch.tensor([i * s.size + r for i in members for r in range(s.size)], device=lin.weight.device)
        if s.axis == 0:
            views.append((lin.weight, 0, idx))
            if lin.bias is not None:
                views.append((lin.bias, 0, idx))
        else:
            views.append((lin.weight, 1, idx))
    return views


def _mean_nll(model: nn.Module, windows: torch.Tensor) -> float:
    losses = window_losses(model, windows)
    return sum(losses.nll) / sum(losses.tokens)


@torch.no_grad()
def measure_probes(model: nn.Module, modules: list[Module], linears: dict[str, nn.Linear], probes: list[Probe],
                   windows: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """(P,) Delta_p: the loss increase with each probe's structures zeroed (the model is restored)."""

    by_name = {m.name: m for m in modules}
    dense = _mean_nll(model, windows)
    deltas = []
    for p in tqdm(probes, desc="saap probes", unit="probe", disable=not progress):
        saved = []
        for tensor, axis, idx in _owned(by_name[p.module], p.members, linears):
            saved.append((tensor, axis, idx, tensor.index_select(axis, idx).clone()))
            tensor.index_fill_(axis, idx, 0.0)
        try:
            deltas.append(_mean_nll(model, windows) - dense)
        finally:
            for tensor, axis, idx, values in saved:
                tensor.index_copy_(axis, idx, values)
    return torch.tensor(deltas, dtype=torch.float64)


def probe_membership(probes: list[Probe], sizes: torch.Tensor) -> torch.Tensor:
    """(P, N) c_j where structure j belongs to probe p, else 0."""
    m = torch.zeros(len(probes), len(sizes), dtype=torch.float64)
    for i, p in enumerate(probes):
        idx = list(p.layout)
        m[i, idx] = sizes[idx]
    return m


def probe_importance(importance: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """(K, B, P) the per-weight importance of each probe: sum_j c_j I_kbj / sum_j c_j over its structures."""
    return torch.einsum("kbn,pn->kbp", importance, membership) / membership.sum(dim=1)


def cached_probe_deltas(setup, modules: list[Module], linears: dict[str, nn.Linear], per_module: int,
                        n_windows: int) -> tuple[list[Probe], torch.Tensor, bool]:
    """The probes and their Delta_p, from the disk cache or measured and stored. (probes, deltas, was_cached)"""

    spec = setup.spec
    probes = choose_probes(modules, linears, per_module, spec.seed)
    calib = parse_data_ref(spec.calib, "calibration")
    ids = windows(calib, setup.tokenizer, "calibration", spec.seqlen, n_windows, spec.seed + PROBE_SEED)
    payload = json.dumps({"v": PROBES_VERSION, "model": setup.fingerprint, "data": str(calib),
                          "windows": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
                          "probes": [asdict(p) for p in probes]})
    path = cache_root() / "saap" / f"probes-{hashlib.sha256(payload.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return probes, torch.tensor(json.loads(path.read_text())["deltas"], dtype=torch.float64), True
    device = next(setup.model.parameters()).device
    deltas = measure_probes(setup.model, modules, linears, probes, ids.to(device))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"deltas": deltas.tolist(), "probes": [asdict(p) for p in probes]}))
    return probes, deltas, False

