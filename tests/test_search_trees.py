"""DEAP PrimitiveTree <-> Node conversion."""

from __future__ import annotations

import random

import pytest
from deap import gp

from metricgp.expr import call, const, leaf, parse, random_tree, to_functional
from metricgp.search.space import space_from_dict
from metricgp.search.trees import Individual, build_grammar, node_to_tree, tree_to_node

SPACE = space_from_dict({
    "leaves": ["W", "X", "G"],
    "operators": ["sqr", "neg", "abs", "sqrt", "exp", "log", "mms", "zsn", "add", "sub", "mul", "div"],
    "constants": {"enabled": True, "low": -2, "high": 2},
})


@pytest.mark.parametrize("seed", range(5))
def test_node_tree_node_round_trip(seed):
    grammar = build_grammar(SPACE)
    rng = random.Random(seed)
    for _ in range(40):
        node = random_tree(rng, 6, ops=SPACE.operators, const_prob=0.2)
        tree = node_to_tree(node, grammar)
        assert tree_to_node(tree) == node
        assert str(tree) == to_functional(node)  # DEAP prints the same functional form
        assert tree.node == node


def test_deap_generated_trees_round_trip():
    grammar = build_grammar(SPACE)
    random.seed(3)
    for _ in range(50):
        tree = Individual(gp.genHalfAndHalf(grammar.pset, 1, 4))
        node = tree_to_node(tree)
        assert node_to_tree(node, grammar) == tree
        assert parse(str(tree)) == node


def test_constants_and_operators_outside_the_space_still_convert():
    # OOS can introduce `abs`, `sub` and folded constants that the space does not list.
    small = build_grammar(space_from_dict({"leaves": ["W", "X"], "operators": ["mul", "sqrt"]}))
    assert small.erc is None
    node = call("sub", call("abs", leaf("W")), call("mul", const(0.5), leaf("G")))
    tree = node_to_tree(node, small)
    assert tree_to_node(tree) == node
    assert len(tree) == node.size() and tree.height == node.depth() - 1


def test_ephemeral_constants_keep_their_value_and_can_be_mutated():
    grammar = build_grammar(SPACE)
    tree = node_to_tree(call("mul", const(1.25), leaf("W")), grammar)
    assert isinstance(tree[1], grammar.erc) and tree[1].value == 1.25
    random.seed(0)
    (mutated,) = gp.mutEphemeral(tree, "one")
    assert tree_to_node(mutated).children[0].value != 1.25
