"""Search spaces as data: the shipped YAML files load, and every mistake names file, key, problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metricgp.errors import MetricGPError
from metricgp.search.space import load_space, space_from_dict, with_overrides
from metricgp.search.trees import build_grammar

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


@pytest.mark.parametrize("name", ["pruner_zero", "extended", "tiny"])
def test_shipped_spaces_load_and_build_a_primitive_set(name):
    space = load_space(SPACES / f"{name}.yaml")
    grammar = build_grammar(space)
    assert set(space.operators) <= set(grammar.pset.mapping)
    assert (grammar.erc is not None) == space.constants.enabled


def test_pruner_zero_space_is_the_papers():
    space = load_space(SPACES / "pruner_zero.yaml")
    assert space.leaves == ("W", "X", "G")
    assert set(space.operators) == {"sqr", "neg", "abs", "tanh", "identity", "log", "exp", "sqrt", "mms",
                                    "zsn", "add", "sub", "mul", "div"}
    assert not space.constants.enabled
    assert (space.limits.init_min_depth, space.limits.init_max_depth) == (3, 5)  # DEAP height 2-4
    assert space.gp.algorithm == "steady_state" and space.gp.tournament_keep == 10


def test_extended_space_adds_constants_and_normalisations():
    space = load_space(SPACES / "extended.yaml")
    assert space.constants.enabled and {"rownorm", "colnorm"} <= set(space.operators)
    assert "ephemeral" in space.gp.mutations


def _write(tmp_path, raw) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


BASE = {"leaves": ["W", "X"], "operators": ["add", "mul"]}


@pytest.mark.parametrize("change, expected", [
    ({"operators": ["add", "mul", "sqrt", "foo"]}, "operators[3]: unknown operator 'foo' (known: "),
    ({"operators": [{"name": "add", "arity": 1}]}, "operators[0]: operator 'add' has arity 2, not 1"),
    ({"operators": ["add", "add"]}, "operators[1]: duplicate operator 'add'"),
    ({"leaves": ["W", "H"]}, "leaves[1]: unknown leaf 'H'"),
    ({"leaves": []}, "leaves: expected a non-empty list"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"gp": {"population": "many"}}, "gp.population: expected an integer, got 'many'"),
    ({"gp": {"population": 1}}, "gp.population: must be >= 2"),
    ({"gp": {"algorithm": "cmaes"}}, "gp.algorithm: unknown algorithm 'cmaes'"),
    ({"gp": {"mutations": ["uniform", "flip"]}}, "gp.mutations[1]: unknown mutation 'flip'"),
    ({"gp": {"cxpb": 1.5}}, "gp.cxpb: must be <= 1.0"),
    ({"gp": {"popsize": 3}}, "gp.popsize: unknown key"),
    ({"limits": {"init_min_depth": 5, "init_max_depth": 3}}, "limits: init_min_depth must not exceed"),
    ({"fidelity": {"windows": [8, 2]}}, "fidelity.windows: must be strictly increasing"),
    ({"constants": {"enabled": "yes"}}, "constants.enabled: expected true or false"),
    ({"constants": {"enabled": True, "low": 1, "high": -1}}, "constants: low (1.0) must be below high"),
    ({"constants": {"values": [0, 1]}}, "constants.values: 0 is not allowed"),
])
def test_malformed_space_names_file_key_and_problem(tmp_path, change, expected):
    path = _write(tmp_path, {**BASE, **change})
    with pytest.raises(MetricGPError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_missing_section_file_and_bad_yaml(tmp_path):
    with pytest.raises(MetricGPError, match="operators: missing"):
        load_space(_write(tmp_path, {"leaves": ["W"]}))
    with pytest.raises(MetricGPError, match="invalid YAML at line"):
        load_space(_write(tmp_path, "leaves: [W\noperators: ]"))
    with pytest.raises(MetricGPError, match="top level"):
        load_space(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(MetricGPError, match="cannot read search space"):
        load_space(tmp_path / "nope.yaml")


def test_overrides_are_validated_and_keep_the_rest():
    space = space_from_dict(BASE, "x.yaml")
    new = with_overrides(space, gp={"population": 7, "seed": None}, fidelity={"windows": (1, 3)})
    assert new.gp.population == 7 and new.gp.seed == space.gp.seed
    assert new.fidelity.windows == (1, 3) and new.source == "x.yaml"
    with pytest.raises(MetricGPError, match="command line: gp.population: must be >= 2"):
        with_overrides(space, gp={"population": 0})


def test_ephemeral_mutation_dropped_without_constants():
    space = space_from_dict({**BASE, "gp": {"mutations": ["uniform", "ephemeral"]}})
    assert space.gp.mutations == ("uniform",)
