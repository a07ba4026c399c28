"""Parser and printers: round trips, precedence, rejection of everything outside the grammar."""

from __future__ import annotations

import random

import pytest

from metricgp.expr import (
    BUILTIN_METRICS,
    FormulaError,
    call,
    const,
    describe,
    leaf,
    parse,
    random_tree,
    resolve_metric,
    to_functional,
    to_infix,
    to_latex,
)

W, X, G = leaf("W"), leaf("X"), leaf("G")


def _random_trees(n: int = 200, seed: int = 0):
    rng = random.Random(seed)
    return [random_tree(rng, rng.randint(1, 6), const_prob=0.2) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(BUILTIN_METRICS))
def test_builtins_round_trip(name):
    node = parse(BUILTIN_METRICS[name])
    assert to_functional(node) == BUILTIN_METRICS[name]
    assert parse(to_infix(node)) == node
    assert resolve_metric(name.upper()) == node


def test_random_trees_round_trip():
    trees = _random_trees()
    assert len({to_functional(t) for t in trees}) > 150  # the generator really varies
    for t in trees:
        assert parse(to_functional(t)) == t, to_functional(t)
        assert parse(to_infix(t)) == t, to_infix(t)
        assert to_latex(t)


def test_infix_tricky_shapes():
    cases = [
        call("neg", const(2.5)),
        call("neg", const(-2.5)),
        call("sub", W, const(-2.5)),
        call("mul", const(-1.0), W),
        call("sub", W, call("sub", X, G)),
        call("div", W, call("mul", X, G)),
        call("neg", call("neg", W)),
        call("mul", call("neg", W), call("add", X, G)),
        call("neg", call("mul", W, X)),
        const(1e-05),
        const(3.4028234663852886e38),
    ]
    for node in cases:
        assert parse(to_infix(node)) == node, to_infix(node)
        assert parse(to_functional(node)) == node


def test_precedence_and_associativity():
    assert parse("W + X * G") == call("add", W, call("mul", X, G))
    assert parse("W - X - G") == call("sub", call("sub", W, X), G)
    assert parse("W / X / G") == call("div", call("div", W, X), G)
    assert parse("(W + X) * G") == call("mul", call("add", W, X), G)
    assert parse("-W * X") == call("mul", call("neg", W), X)
    assert parse("-2.5") == const(-2.5)
    assert parse("-(2.5)") == call("neg", const(2.5))
    assert parse("1e-3 * W") == call("mul", const(0.001), W)
    assert parse(" mul( abs(W) ,sqrt(X) ) ") == parse("abs(W) * sqrt(X)")
    assert parse("add(W, X * G)") == call("add", W, call("mul", X, G))


def test_constants_print_shortest():
    assert to_functional(call("mul", const(2), W)) == "mul(2.0, W)"
    assert to_functional(const(0.001)) == "0.001"


@pytest.mark.parametrize(
    "text",
    ["abs(foo)", "__import__('os')", "__import__", "W.__class__", '"W"', "'W'", "W ** 2", "1.5.3",
     "", "   ", "(W", "W)", "add(W)", "abs(W, X)", "abs", "W(X)", "W X", "W +", "* W", "add(W,)",
     "1e999", "W; X", "lambda: W", "W[0]", "2W", "os.system('ls')", "abs(W))", "sqrt()"],
)
def test_rejects(text):
    with pytest.raises(FormulaError):
        parse(text)


def test_error_messages_name_problem_and_position():
    with pytest.raises(FormulaError, match=r"unknown name 'foo' at column 5 in 'abs\(foo\)'; known: W, X, G"):
        parse("abs(foo)")
    with pytest.raises(FormulaError, match="takes 2 argument"):
        parse("mul(W)")
    with pytest.raises(FormulaError, match="unknown name"):
        resolve_metric("not-a-metric")


def test_limits():
    with pytest.raises(FormulaError, match="longer than"):
        parse("W + " * 600 + "W")
    with pytest.raises(FormulaError, match="deeper"):
        parse("abs(" * 70 + "W" + ")" * 70)
    deep_ok = "abs(" * 40 + "W" + ")" * 40
    assert parse(deep_ok).depth() == 41


def test_describe():
    d = describe(resolve_metric("wanda"))
    assert d["functional"] == "mul(abs(W), sqrt(X))"
    assert d["infix"] == "abs(W) * sqrt(X)"
    assert d["size"] == 5 and d["depth"] == 3 and d["leaves"] == ["W", "X"]
    assert "sqrt(X)" in d["sympy"] and "Abs(W)" in d["sympy"]
    assert r"\sqrt" in d["latex"]
