"""One operator table: an operator registered only in `OPERATORS` parses, prints in every form,
compiles, simplifies, gets a canonical key and enters a search space's DEAP primitive set."""

from __future__ import annotations

import pytest
import sympy
import torch

from metricgp.expr import (
    OPERATORS,
    call,
    canonical_key,
    compile_metric,
    const,
    describe,
    leaf,
    parse,
    simplify,
    to_functional,
    to_infix,
    to_latex,
    to_sympy,
)
from metricgp.expr.ops import FOLLOWS, Operator
from metricgp.search.space import space_from_dict
from metricgp.search.trees import build_grammar, node_to_tree, tree_to_node

W, X, G = leaf("W"), leaf("X"), leaf("G")

CUBE = Operator("cube", 1, lambda x: x.clamp(-1e12, 1e12) ** 3, latex=r"\left({0}\right)^{{3}}",
                sympy_fn=lambda a: a**3, sign=FOLLOWS, doc="x^3")
# an infix operator on a precedence level of its own, below + and -
WMAX = Operator("wmax", 2, torch.maximum, "|", 0, r"\max\left({0}, {1}\right)", latex_grouped=True,
                sympy_fn=sympy.Max, sign=FOLLOWS, doc="max(x, y)")
# the least an operator needs: a name, an arity and a function
SOFTSIGN = Operator("softsign", 1, lambda x: x / (1 + x.abs()))


@pytest.fixture()
def extra_ops(monkeypatch):
    for op in (CUBE, WMAX, SOFTSIGN):
        monkeypatch.setitem(OPERATORS, op.name, op)


def _stats() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"W": torch.randn(4, 6, generator=g), "X": torch.rand(1, 6, generator=g), "G": torch.rand(4, 6, generator=g)}


def test_a_new_unary_operator_works_end_to_end(extra_ops):
    tree = parse("cube(neg(neg(W))) * sqrt(X)")
    assert tree == call("mul", call("cube", call("neg", call("neg", W))), call("sqrt", X))
    assert to_functional(tree) == "mul(cube(neg(neg(W))), sqrt(X))"
    assert parse(to_infix(tree)) == tree and parse(to_functional(tree)) == tree
    assert to_latex(parse("cube(W + X)")) == r"\left(W + X\right)^{3}"
    assert to_sympy(parse("cube(W)")) == sympy.Symbol("W", real=True) ** 3
    assert describe(tree)["sympy"] == "W**3*sqrt(X)"
    stats = _stats()
    assert torch.allclose(compile_metric(parse("cube(W)"))(stats), stats["W"] ** 3)
    assert simplify(tree, "exact") == parse("mul(cube(W), sqrt(X))")
    assert simplify(parse("abs(cube(X))"), "exact") == parse("cube(X)")  # its sign fact: >= 0 if x is
    assert simplify(parse("abs(cube(W))"), "exact") == parse("abs(cube(W))")
    assert simplify(parse("cube(2.0)"), "exact") == const(8.0)  # folded through its own fn
    # sympy sees through it: W^3 is W * W^2; and in the "tensor" scope a root scale still goes
    assert canonical_key(parse("cube(W)"), "exact") == canonical_key(parse("mul(W, sqr(W))"), "exact")
    assert canonical_key(parse("mul(2.0, cube(W))")) == canonical_key(parse("cube(W)"))


def test_a_new_infix_operator_gets_its_own_precedence_level(extra_ops):
    tree = parse("W | X + G")  # '|' binds looser than '+'
    assert tree == call("wmax", W, call("add", X, G))
    assert to_infix(tree) == "W | X + G"
    assert to_infix(parse("(W | X) + G")) == "(W | X) + G"
    assert to_infix(parse("W | (X | G)")) == "W | (X | G)"  # left-associative, as + - * /
    for text in ("W | X + G", "(W | X) * G", "wmax(W, X) | -G", "W | X | G"):
        assert parse(to_infix(parse(text))) == parse(text)
    assert to_latex(tree) == r"\max\left(W, X + G\right)"
    assert str(to_sympy(parse("W | X"))) == "Max(W, X)"
    stats = _stats()
    assert torch.equal(compile_metric(parse("W | G"))(stats), torch.maximum(stats["W"], stats["G"]))
    assert simplify(parse("abs(X | G)"), "exact") == parse("X | G")
    assert canonical_key(parse("W | X"), "exact") == canonical_key(parse("X | W"), "exact")  # Max is symmetric


def test_an_operator_with_only_a_name_arity_and_function_works_everywhere(extra_ops):
    tree = parse("softsign(mul(W, X))")
    assert to_infix(tree) == "softsign(W * X)" and parse(to_infix(tree)) == tree
    assert to_latex(tree) == r"\operatorname{softsign}\left(W \cdot X\right)"
    assert str(to_sympy(tree)) == "softsign(W*X)"  # opaque to sympy, but keyed
    assert {"functional", "infix", "latex", "sympy"} <= set(describe(tree))
    assert canonical_key(tree) == canonical_key(parse("softsign(mul(X, W))"))
    assert canonical_key(tree) != canonical_key(parse("softsign(mul(W, G))"))
    assert simplify(parse("softsign(identity(W))"), "exact") == parse("softsign(W)")
    assert simplify(parse("abs(softsign(W))"), "exact") == parse("abs(softsign(W))")  # unknown sign: kept
    stats = _stats()
    wx = stats["W"] * stats["X"]
    assert torch.allclose(compile_metric(tree)(stats), wx / (1 + wx.abs()))


def test_a_new_operator_enters_a_search_space(extra_ops):
    space = space_from_dict({"leaves": ["W", "X"], "operators": ["cube", "wmax", "softsign", "mul"]})
    grammar = build_grammar(space)
    assert {"cube", "wmax", "softsign"} <= set(grammar.pset.mapping)
    node = parse("wmax(cube(W), softsign(X))")
    assert tree_to_node(node_to_tree(node, grammar)) == node


def test_the_table_is_the_only_source_of_operator_facts():
    import metricgp.expr.printing as printing

    simplify_module = __import__("metricgp.expr.simplify", fromlist=["RULES"])
    for module in (printing, simplify_module):
        for name in ("_PREC", "_ELEMENTWISE", "_ELEMENTWISE_NONNEG"):
            assert not hasattr(module, name), f"{module.__name__}.{name}"
    for op in OPERATORS.values():  # every built-in elementwise operator has a closed sympy form
        assert op.latex and (op.sympy_fn is not None or not op.elementwise), op.name
