"""Masks hit the target sparsity exactly, deterministically, for every pattern."""

from __future__ import annotations

import pytest
import torch

from metricgp.errors import MetricGPError
from metricgp.prune.patterns import NM, PATTERNS, Unstructured, parse_pattern, parse_setting


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_unstructured_sparsity_is_exact(sparsity, scope):
    scores = torch.randn(24, 40)
    keep = Unstructured(sparsity, scope).mask(scores)
    if scope == "row":
        assert ((~keep).sum(1) == round(sparsity * 40)).all()
        kept_min = scores.masked_fill(~keep, float("inf")).amin(1)
        pruned_max = scores.masked_fill(keep, -float("inf")).amax(1)
        assert (kept_min >= pruned_max).all()  # within each row the highest scores survive
    else:
        assert int((~keep).sum()) == round(sparsity * 24 * 40)
        assert scores[keep].min() >= scores[~keep].max()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_drops_exactly_n_of_every_m(n, m):
    scores = torch.randn(16, 8 * m)
    keep = NM(n, m).mask(scores)
    groups = (~keep).reshape(16, -1, m).sum(-1)
    assert (groups == n).all()
    assert NM(n, m).sparsity == n / m


def test_ties_and_nans_are_deterministic():
    scores = torch.zeros(3, 8)
    scores[1, 2] = float("nan")
    first = Unstructured(0.5).mask(scores)
    assert torch.equal(first, Unstructured(0.5).mask(scores.clone()))
    assert ((~first).sum(1) == 4).all()
    assert not first[1, 2]  # NaN counts as the lowest score: pruned first
    # ties broken by position: the first positions go
    assert torch.equal(first[0], torch.tensor([False] * 4 + [True] * 4))
    nm = NM(2, 4).mask(torch.zeros(2, 8))
    assert torch.equal(nm[0], torch.tensor([False, False, True, True] * 2))


@pytest.mark.parametrize("text,sparsity,message", [
    ("unstructured", 1.5, "strictly between 0 and 1"),
    ("unstructured", 0.0, "strictly between 0 and 1"),
    ("unstructured", None, "needs a sparsity"),
    ("4:2", None, "0 < N < M"),
    ("0:4", None, "0 < N < M"),
    ("2:4", 0.7, "fixes sparsity at 0.5; got --sparsity 0.7"),
    ("4:8", 0.6, "fixes sparsity at 0.5"),
    ("blocky", 0.5, "unknown pattern"),
])
def test_bad_patterns_are_user_errors(text, sparsity, message):
    with pytest.raises(MetricGPError, match=message):
        parse_pattern(text, sparsity)


def test_nm_needs_divisible_inputs():
    with pytest.raises(MetricGPError, match="not a multiple"):
        NM(2, 4).mask(torch.randn(2, 6))


def test_parse_pattern_forms():
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern("2:4", 0.5) == NM(2, 4)
    assert parse_pattern("Unstructured", 0.3) == Unstructured(0.3, "row")
    assert parse_pattern("unstructured-layer", 0.3) == Unstructured(0.3, "layer")


def test_one_registry_parses_every_pattern_kind():
    assert set(PATTERNS) == {"unstructured", "unstructured-layer", "N:M"}
    assert [k for k, kind in PATTERNS.items() if kind.fixes_sparsity] == ["N:M"]
    # a default sparsity fills in for kinds that need one, never for one that fixes its own
    assert parse_pattern("unstructured", None, default_sparsity=0.5) == Unstructured(0.5, "row")
    assert parse_pattern("1:4", None, default_sparsity=0.5) == NM(1, 4)
    assert parse_pattern("unstructured", 0.7, default_sparsity=0.5) == Unstructured(0.7, "row")
    with pytest.raises(MetricGPError, match="fixes sparsity at 0.5; got --sparsity 0.7") as err:
        parse_pattern("2:4", 0.7, default_sparsity=0.5)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.6, "layer"), NM(2, 4), NM(4, 8)])
def test_settings_round_trip(pattern):
    assert parse_setting(pattern.setting) == pattern


def test_settings_text():
    assert parse_setting("0.5") == Unstructured(0.5) and parse_setting("0.5").setting == "0.5"
    assert parse_setting("0.60").setting == "0.6" and parse_setting("0.6").label == "60%"
    assert parse_setting("unstructured-layer@0.5") == Unstructured(0.5, "layer")
    assert parse_setting("2:4").label == "2:4"
    with pytest.raises(MetricGPError, match="needs a sparsity"):
        parse_setting("unstructured")
    with pytest.raises(MetricGPError, match="bad sparsity"):
        parse_setting("unstructured@half")


@pytest.mark.parametrize("threads", [1, 2])
def test_kth_smallest_equals_kthvalue_and_masks_match_a_stable_sort(threads):
    from metricgp.prune.patterns import _prune_lowest, kth_smallest

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        # big enough for the threaded path; coarse values make many ties at the threshold
        scores = torch.randint(0, 7, (512, 640), generator=gen).float()
        scores[:256] = torch.randn(256, 640, generator=gen)
        scores[3, 5] = float("nan")
        for k in (1, 320, 639):
            clean = torch.nan_to_num(scores, nan=float("-inf"))
            assert torch.equal(kth_smallest(clean, k), clean.kthvalue(k, dim=-1, keepdim=True).values)
            keep = _prune_lowest(scores, k)
            order = torch.argsort(clean, dim=-1, stable=True)
            expected = torch.ones_like(keep)
            expected.scatter_(-1, order[:, :k], False)
            assert torch.equal(keep, expected), k
    finally:
        torch.set_num_threads(old)
