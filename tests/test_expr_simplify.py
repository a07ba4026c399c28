"""OOS rules one by one, rank preservation on random trees, canonical keys, and simplification scopes."""

from __future__ import annotations

import random

import pytest
import torch

from metricgp.expr import (
    RANK_RULES,
    RULES,
    SCOPES,
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

# (rule name, input, expected output in scope "exact")
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
    assert to_functional(simplify(parse(text), scope="exact")) == want
    node = parse(text)
    applied = next(r for r in RULES if r.name == rule).apply(node)
    assert applied is not None and applied != node  # this rule, not another, matches the input


def test_rules_apply_bottom_up_to_a_fixed_point():
    assert to_functional(simplify(parse("add(W, add(2.0, mul(3.0, 4.0)))"), scope="exact")) == \
        "add(W, 14.0)"
    assert simplify(parse("neg(neg(neg(neg(abs(neg(abs(X)))))))"), scope="exact") == X


@pytest.mark.parametrize(
    "text",
    ["div(W, W)", "div(X, X)", "log(exp(W))", "exp(log(W))", "abs(W)", "sqr(W)", "sub(W, X)",
     "div(neg(W), neg(X))", "rownorm(2.0)", "mms(mms(W) * X)"],
)
def test_inexact_rewrites_are_not_applied(text):
    node = parse(text)
    assert simplify(node, scope="exact") == node


def test_exp_log_needs_abs_to_vanish():
    # exp(log W) -> |W| + eps would grow the tree, so it is kept as is
    assert simplify(parse("exp(log(W))"), scope="exact") == parse("exp(log(W))")


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
def test_tensor_scope_root_rules(text, want):
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


def test_simplify_never_grows_in_the_exact_scope():
    rng = random.Random(2)
    for _ in range(200):
        tree = random_tree(rng, rng.randint(1, 6), const_prob=0.2)
        assert simplify(tree, scope="exact").size() <= tree.size()


def test_canonical_key_equivalences():
    k = canonical_key
    assert k(parse("mul(W, X)")) == k(parse("mul(X, W)"))
    assert k(parse("add(W, W)")) == k(parse("mul(2.0, W)"))
    assert k(parse("add(W, W)"), scope="exact") == k(parse("mul(2.0, W)"), scope="exact")
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
    assert k(parse("mul(2.0, W)"), scope="exact") != k(parse("W"), scope="exact")


def test_canonical_key_is_total_and_falls_back_for_big_trees():
    rng = random.Random(3)
    trees = [t for t in (random_tree(rng, 6, const_prob=0.1) for _ in range(100)) if t.size() <= 30]
    for t in trees:
        for scope in SCOPES:
            key = canonical_key(t, scope)
            assert isinstance(key, str) and key
    big = parse("+".join(["sqr(W * X + G)"] * 30))
    assert canonical_key(big).startswith("tree:")
    # constants: all rank alike in one tensor (a shift of 0), but they are different functions
    assert canonical_key(const(1.0)) == canonical_key(const(2.0))
    assert canonical_key(const(1.0), "exact") != canonical_key(const(2.0), "exact")


def test_rank_only_still_works_but_is_deprecated():
    text = parse("add(mul(3.0, abs(W)), 1.0)")
    with pytest.deprecated_call():
        assert simplify(text, rank_only=True) == simplify(text, "tensor") == parse("abs(W)")
    with pytest.deprecated_call():
        assert simplify(text, rank_only=False) == simplify(text, "exact") == text
    with pytest.deprecated_call():
        assert canonical_key(text, rank_only=False) == canonical_key(text, "exact")
    with pytest.raises(ValueError, match="unknown simplification scope"):
        simplify(text, "row")


# --------------------------------------------------------------------------------- scopes

WANDA = "mul(abs(W), sqrt(X))"


def test_scopes_registry():
    assert set(SCOPES) == {"exact", "tensor", "global"}
    assert SCOPES["exact"] == () and set(SCOPES["tensor"]) == set(RANK_RULES)
    assert [r.name for r in SCOPES["global"]] == ["root_scale"]


@pytest.mark.parametrize("text", [f"mms({WANDA})", f"add({WANDA}, 1.0)", f"zsn({WANDA})",
                                  f"sub(2.0, neg({WANDA}))"])
def test_shift_and_normalisation_are_rank_preserving_only_within_a_tensor(text):
    tree, wanda = parse(text), parse(WANDA)
    assert simplify(tree, "tensor") == wanda
    assert canonical_key(tree, "tensor") == canonical_key(wanda, "tensor")
    assert simplify(tree, "global") == simplify(tree, "exact")  # the root transform is kept
    assert canonical_key(tree, "global") != canonical_key(wanda, "global")


@pytest.mark.parametrize("text, want", [(f"mul(2.0, {WANDA})", WANDA), (f"div({WANDA}, 0.5)", WANDA),
                                        (f"mul({WANDA}, -3.0)", f"neg({WANDA})")])
def test_constant_scale_is_rank_preserving_globally(text, want):
    tree = parse(text)
    assert simplify(tree, "global") == parse(want)
    assert canonical_key(tree, "global") == canonical_key(parse(want), "global")
    assert canonical_key(tree, "global") != canonical_key(tree, "exact")


def test_global_scope_strips_sympy_scales_but_not_shifts():
    # sympy exposes factors the tree rules do not see: 2*W + 2*X is a scale of W + X, W + W + 1 is not
    assert canonical_key(parse("add(add(W, X), add(W, X))"), "global") == canonical_key(parse("add(W, X)"), "global")
    assert canonical_key(parse("add(add(W, 1.0), W)"), "global") != canonical_key(parse("W"), "global")
    assert canonical_key(parse("add(add(W, 1.0), W)"), "tensor") == canonical_key(parse("W"), "tensor")


def _layers(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two "layers" of different widths and weight scales, as layers of one model are."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols, scale in ((12, 48, 1.0), (12, 24, 2.0)):  # comparable row sums
        out.append({"W": scale * torch.randn(rows, cols, generator=g), "X": torch.rand(1, cols, generator=g) * 4,
                    "G": torch.rand(rows, cols, generator=g)})
    return out


def _row_sums(text: str | object, layers) -> list[torch.Tensor]:
    fn = compile_metric(parse(text) if isinstance(text, str) else text)
    return [fn(stats).double().sum(dim=1) for stats in layers]


def _order(values: torch.Tensor) -> list[int]:
    return torch.argsort(values, stable=True).tolist()


def test_why_scopes_exist_a_root_mms_reorders_structures_across_layers_not_within_one():
    """Row scores reduced by sum, then ranked: within one layer a root mms (an increasing affine map
    with that layer's coefficients) keeps the order of the rows; across two layers it does not,
    so a structured pruner ranking rows globally would prune different rows."""
    layers = _layers()
    plain = _row_sums(WANDA, layers)
    normed = _row_sums(f"mms({WANDA})", layers)
    shifted = _row_sums(f"add({WANDA}, 1.0)", layers)
    scaled = _row_sums(f"mul(2.5, {WANDA})", layers)
    for a, b in zip(plain, normed, strict=True):
        assert _order(a) == _order(b)  # within each layer: same ranking
    assert _order(torch.cat(plain)) != _order(torch.cat(normed))  # across layers: not
    assert _order(torch.cat(plain)) != _order(torch.cat(shifted))  # a shift adds 48 vs 24 per row
    assert _order(torch.cat(plain)) == _order(torch.cat(scaled))  # a scale is the same everywhere


def test_global_simplification_keeps_the_global_ranking_of_reduced_scores():
    """Random trees under random root scales (and the random trees' own root transforms): what
    scope "global" strips never changes the cross-layer order of sum / max / l2 row reductions."""
    layers = _layers(1)
    rng = random.Random(4)
    reductions = (lambda s: s.sum(1), lambda s: s.amax(1), lambda s: s.norm(dim=1))
    checked = 0
    for i in range(250):
        tree = random_tree(rng, rng.randint(2, 4), const_prob=0.1)
        c = const(round(rng.choice((-1, 1)) * rng.uniform(0.1, 5.0), 2))
        # root transforms valid globally (scales) and not (a shift, mms): the latter must be kept
        tree = (tree, call("mul", c, tree), call("div", tree, c), call("add", tree, c), call("mms", tree))[i % 5]
        simple = simplify(tree, "global")
        if simple == simplify(tree, "exact"):
            continue  # no root rule fired
        scores = [[compile_metric(t)(stats).double() for stats in layers] for t in (tree, simple)]
        if not all(torch.isfinite(s).all() for per in scores for s in per):
            continue
        # rounding noise of a reduction is ~ float32 eps times the sum of the magnitudes it adds up
        noise = 1e-5 * max(float(s.abs().sum(1).max()) for s in scores[0])
        for reduce in reductions:
            a, b = (torch.cat([reduce(s) for s in per]) for per in scores)
            if torch.sort(a).values.diff().min() <= noise:
                continue  # (near-)ties: rounding may swap them; a real reordering would not be one
            checked += 1
            assert _order(a) == _order(b), (to_functional(tree), to_functional(simple))
    assert checked > 80, checked
