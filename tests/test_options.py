"""One model/data option group for every entry point (the experiments' too), one name per meaning,
old names as deprecated aliases, and choices where an option has a fixed set of values."""

from __future__ import annotations

import argparse

import pytest

from metricgp.cli import apply, darwin
from metricgp.cli import search as search_cli
from metricgp.cli.options import add_model_data_options, evaluator_spec, model_data_fields
from metricgp.errors import MetricGPError
from metricgp.evaluate import EvaluatorSpec
from metricgp.experiments import bench, compare
from metricgp.experiments import darwin as darwin_compare
from metricgp.experiments import structured as experiments

PARSERS = {"apply": apply.build_parser, "compare": compare.build_parser, "bench": bench.build_parser,
           "search": search_cli.build_parser, "darwin": darwin.build_parser, "experiments": experiments.build_parser}
REQUIRED = {"apply": ["--metric", "wanda", "--out", "x"], "compare": [], "bench": ["throughput"], "search": [],
            "darwin": [], "experiments": ["table"]}
GIVEN = ["--model", "m", "--dtype", "fp32", "--device", "cpu", "--calib", "ptb", "--n-calib", "3",
         "--seqlen", "64", "--calib-seed", "7", "--offload"]


@pytest.mark.parametrize("name", PARSERS)
def test_every_entry_point_has_the_one_model_data_group(name):
    parser = PARSERS[name]()
    assert [g.title for g in parser._action_groups].count("model and calibration data") == 1
    args = parser.parse_args([*REQUIRED[name], *GIVEN])
    assert model_data_fields(args) == {"model": "m", "dtype": "fp32", "device": "cpu", "calib": "ptb",
                                       "n_calib": 3, "seqlen": 64, "seed": 7, "offload": True}
    defaults = model_data_fields(parser.parse_args(REQUIRED[name]))
    spec = EvaluatorSpec()
    assert defaults == {k: getattr(spec, k) for k in defaults}  # one set of defaults, the spec's


@pytest.mark.parametrize("name", ["apply", "compare", "bench", "darwin", "experiments"])
def test_plain_seed_is_gone_where_it_was_ambiguous(name, capsys):
    with pytest.raises(SystemExit):
        PARSERS[name]().parse_args([*REQUIRED[name], "--seed", "1"])
    assert "unrecognized arguments: --seed" in capsys.readouterr().err


@pytest.mark.parametrize("old", ["--seed", "--gp-seed"])
def test_old_search_seed_names_are_deprecated_aliases(old, capsys):
    args = search_cli.build_parser().parse_args([old, "3"])
    assert args.search_seed == 3 and args.calib_seed == 0
    assert f"warning: {old} is deprecated; use --search-seed" in capsys.readouterr().err
    args = search_cli.build_parser().parse_args(["--search-seed", "4", "--calib-seed", "5"])
    assert (args.search_seed, args.calib_seed) == (4, 5) and capsys.readouterr().err == ""
    assert old not in search_cli.build_parser().format_help()  # hidden: documented commands only


def test_one_name_per_meaning_in_search_and_darwin(capsys):
    """The search's random seed and its fitness data are spelt as darwin spells them."""
    for build in (search_cli.build_parser, darwin.build_parser):
        args = build().parse_args(["--search-seed", "2", "--fitness-data", "ptb"])
        assert (args.search_seed, args.fitness_data) == (2, "ptb")
    args = search_cli.build_parser().parse_args(["--valid", "c4"])
    assert args.fitness_data == "c4"
    assert "warning: --valid is deprecated; use --fitness-data" in capsys.readouterr().err


@pytest.mark.parametrize("build", [apply.build_parser, darwin.build_parser])
def test_recover_method_has_choices(build, capsys):
    with pytest.raises(SystemExit):
        build().parse_args(["--recover-method", "lorax", "--metric", "wanda", "--out", "x"])
    assert "invalid choice: 'lorax'" in capsys.readouterr().err


def test_apply_help_shows_the_structured_mode():
    text = apply.build_parser().format_help()
    for option in ("--structured", "--keep", "--method", "--importance", "--estimators", "--pattern", "--mode"):
        assert option in text
    assert "structured mode (--structured)" in text


def test_darwin_compare_parser():
    args = darwin_compare.build_parser().parse_args(["a", "b", "--out", "o"])
    assert [str(r) for r in args.runs] == ["a", "b"] and str(args.out) == "o"
    with pytest.raises(SystemExit):
        darwin_compare.build_parser().parse_args(["a"])  # --out is required


def test_bench_panel_seed_is_its_own_option():
    args = bench.build_parser().parse_args(["fidelity", "--panel-seed", "9", "--calib-seed", "2"])
    assert args.panel_seed == 9 and model_data_fields(args)["seed"] == 2


def test_the_group_serves_a_separate_parser():
    """A parser of one's own gets the same group."""
    p = argparse.ArgumentParser()
    add_model_data_options(p)
    p.add_argument("--structured", action="store_true")
    args = p.parse_args(["--structured", "--calib-seed", "2", "--seqlen", "128"])
    spec = evaluator_spec(args, pattern="2:4", sparsity=0.5)
    assert isinstance(spec, EvaluatorSpec) and (spec.seed, spec.seqlen, spec.pattern) == (2, 128, "2:4")
    with pytest.raises(MetricGPError, match="--n-calib must be at least 1, got 0"):
        model_data_fields(p.parse_args(["--n-calib", "0"]))
    with pytest.raises(MetricGPError, match="--seqlen must be at least 2"):
        model_data_fields(p.parse_args(["--seqlen", "1"]))
