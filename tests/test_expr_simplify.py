"""OOS rules one by one, rank preservation on random trees, and canonical keys."""

from __future__ import annotations

import random
import time

import pytest
import torch

from metricgp.expr import (
    RANK_RULES,
    RULES,
    call,
    canonical_key,
    compile_metric,
    const,
    leaf,
    parse,
    random_tree,
    simplify,
    to_functional,
)
from metricgp.expr.ops import LOG_EPS

W, X, G = leaf("W"), leaf("X"), leaf("G")
A = call("add", W, X)  # a signed, non-leaf subtree

# (rule name, input, expected output with rank_only=False)
CASES = [
    ("neg_neg", "neg(neg(W))", "W"),
    ("abs_neg", "abs(neg(W))", "abs(W)"),
    ("abs_nonneg", "abs(abs(W))", "abs(W)"),
    ("abs_nonneg", "abs(sqr(W))", "sqr(W)"),
    ("abs_nonneg", "abs(sqrt(W))", "sqrt(W)"),
    ("abs_nonneg", "abs(X)", "X"),
    ("abs_nonneg", "abs(G)", "G"),
    ("abs_nonneg", "abs(mul(X, G))", "mul(X, G)"),
    ("even_neg", "sqr(neg(W))", "sqr(W)"),
    ("even_neg", "sqrt(neg(W))", "sqrt(W)"),
    ("sqrt_sqr", "sqrt(sqr(W))", "abs(W)"),
    ("sqr_sqrt", "sqr(sqrt(W))", "abs(W)"),
    ("exp_log", "exp(log(X))", f"add(X, {LOG_EPS!r})"),
    ("identity", "identity(W)", "W"),
    ("sub_self", "sub(add(W, X), add(W, X))", "0.0"),
    ("div_self", "div(add(X, 1.0), add(X, 1.0))", "1.0"),
    ("mul_zero", "mul(W, 0.0)", "0.0"),
    ("add_neg", "add(W, neg(X))", "sub(W, X)"),
    ("add_neg", "add(neg(X), W)", "sub(W, X)"),
    ("sub_neg", "sub(W, neg(X))", "add(W, X)"),
    ("mul_neg_neg", "mul(neg(W), neg(X))", "mul(W, X)"),
    ("normalise_twice", "mms(mms(W))", "mms(W)"),
    ("normalise_twice", "zsn(zsn(W))", "zsn(W)"),
    ("normalise_twice", "mms(zsn(W))", "mms(W)"),
    ("normalise_twice", "zsn(mms(W))", "zsn(W)"),
    ("fold", "mul(3.0, 4.0)", "12.0"),
    ("fold", "mms(3.0)", "0.0"),
    ("fold", "log(0.0)", repr(float(torch.log(torch.tensor(LOG_EPS))))),
]


@pytest.mark.parametrize(("rule", "text", "want"), CASES)
def test_each_rule(rule, text, want):
    assert rule in {r.name for r in RULES}
    assert to_functional(simplify(parse(text), rank_only=False)) == want
    node = parse(text)
    applied = next(r for r in RULES if r.name == rule).apply(node)
    assert applied is not None and applied != node  # this rule, not another, matches the input


def test_rules_apply_bottom_up_to_a_fixed_point():
    assert to_functional(simplify(parse("add(W, add(2.0, mul(3.0, 4.0)))"), rank_only=False)) == \
        "add(W, 14.0)"
    assert simplify(parse("neg(neg(neg(neg(abs(neg(abs(X)))))))"), rank_only=False) == X


@pytest.mark.parametrize(
    "text",
    ["div(W, W)", "div(X, X)", "log(exp(W))", "exp(log(W))", "abs(W)", "sqr(W)", "sub(W, X)",
     "div(neg(W), neg(X))", "rownorm(2.0)", "mms(mms(W) * X)"],
)
def test_inexact_rewrites_are_not_applied(text):
    node = parse(text)
    assert simplify(node, rank_only=False) == node


def test_exp_log_needs_abs_to_vanish():
    # exp(log W) -> |W| + eps would grow the tree, so it is kept as is
    assert simplify(parse("exp(log(W))"), rank_only=False) == parse("exp(log(W))")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("mul(3.0, abs(W))", "abs(W)"),
        ("div(abs(W), 2.0)", "abs(W)"),
        ("mul(abs(W), -2.0)", "neg(abs(W))"),
        ("add(abs(W), 5.0)", "abs(W)"),
        ("sub(abs(W), 5.0)", "abs(W)"),
        ("sub(5.0, abs(W))", "neg(abs(W))"),
        ("mms(zsn(mul(2.0, add(abs(W), 1.0))))", "abs(W)"),
        ("identity(mms(W))", "W"),
        ("exp(log(X))", "X"),
        ("exp(W)", "exp(W)"),  # monotone but not affine: kept
        ("div(2.0, W)", "div(2.0, W)"),  # decreasing and non-affine: kept
    ],
)
def test_rank_only_root_rules(text, want):
    assert {r.name for r in RANK_RULES} == {"root_scale", "root_shift", "root_normalise"}
    assert to_functional(simplify(parse(text))) == want


def _row_mask(score: torch.Tensor) -> torch.Tensor:
    keep = score.shape[1] // 2
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], True)
    return mask


def _has_ties(score: torch.Tensor) -> bool:
    s = torch.sort(score, dim=1).values
    return bool((s[:, 1:] == s[:, :-1]).any())


def test_simplify_preserves_pruning_masks_on_random_trees():
    g = torch.Generator().manual_seed(0)
    stats = {"W": torch.randn(16, 32, generator=g), "X": torch.rand(1, 32, generator=g),
             "G": torch.rand(16, 32, generator=g)}
    rng = random.Random(1)
    checked = changed = 0
    for _ in range(200):
        tree = random_tree(rng, rng.randint(2, 5), const_prob=0.1)
        simple = simplify(tree)
        assert simple.size() <= tree.size()
        assert simplify(simple) == simple  # fixed point
        if simple != tree:
            changed += 1
        score = compile_metric(tree)(stats)
        if _has_ties(score):
            continue
        checked += 1
        assert torch.equal(_row_mask(compile_metric(simple)(stats)), _row_mask(score)), (
            f"{to_functional(tree)} -> {to_functional(simple)}")
    assert checked > 100 and changed > 20, (checked, changed)


def test_simplify_never_grows_without_rank_only():
    rng = random.Random(2)
    for _ in range(200):
        tree = random_tree(rng, rng.randint(1, 6), const_prob=0.2)
        assert simplify(tree, rank_only=False).size() <= tree.size()


def test_canonical_key_equivalences():
    k = canonical_key
    assert k(parse("mul(W, X)")) == k(parse("mul(X, W)"))
    assert k(parse("add(W, W)")) == k(parse("mul(2.0, W)"))
    assert k(parse("add(W, W)"), rank_only=False) == k(parse("mul(2.0, W)"), rank_only=False)
    assert k(parse("add(mul(W, X), G)")) == k(parse("G + X * W"))
    assert k(parse("abs(neg(W)) * sqrt(X)")) == k(parse("wanda".replace("wanda", "sqrt(X) * abs(W)")))
    assert k(parse("sqr(W)")) == k(parse("mul(W, W)"))
    assert k(parse("mms(abs(W))")) == k(parse("abs(W)"))  # rank-equivalent
    assert k(parse("add(W, W)")) == k(parse("W"))  # rank-equivalent


def test_canonical_key_non_equivalences():
    k = canonical_key
    assert k(parse("abs(W)")) != k(parse("W"))
    assert k(parse("W")) != k(parse("neg(W)"))  # reversed ranking prunes the other half
    assert k(parse("mul(W, X)")) != k(parse("mul(W, G)"))
    assert k(parse("log(exp(W))")) != k(parse("W"))
    assert k(parse("mms(W) * X")) != k(parse("W * X"))  # mms inside a product is not affine there
    assert k(parse("mul(2.0, W)"), rank_only=False) != k(parse("W"), rank_only=False)


def test_canonical_key_is_fast_and_total():
    rng = random.Random(3)
    trees = [random_tree(rng, 6, const_prob=0.1) for _ in range(100)]
    trees = [t for t in trees if t.size() <= 30]
    start = time.perf_counter()
    for t in trees:
        assert canonical_key(t)
    per_tree = (time.perf_counter() - start) / max(len(trees), 1)
    assert per_tree < 0.05, per_tree
    big = parse("+".join(["sqr(W * X + G)"] * 30))
    assert canonical_key(big).startswith("tree:")
    assert canonical_key(const(1.0)) == canonical_key(const(1.0))
