"""One model/data option group for every entry point, and seeds with one meaning per name."""

from __future__ import annotations

import argparse

import pytest

from metricgp import apply, bench, compare
from metricgp.errors import MetricGPError
from metricgp.evaluate import EvaluatorSpec
from metricgp.options import add_model_data_options, evaluator_spec, model_data_fields
from metricgp.search import __main__ as search_cli

PARSERS = {"apply": apply.build_parser, "compare": compare.build_parser, "bench": bench.build_parser,
           "search": search_cli.build_parser}
REQUIRED = {"apply": ["--metric", "wanda", "--out", "x"], "compare": [], "bench": ["throughput"], "search": []}
GIVEN = ["--model", "m", "--dtype", "fp32", "--device", "cpu", "--calib", "ptb", "--n-calib", "3",
         "--seqlen", "64", "--calib-seed", "7"]


@pytest.mark.parametrize("name", PARSERS)
def test_every_entry_point_has_the_one_model_data_group(name):
    parser = PARSERS[name]()
    assert [g.title for g in parser._action_groups].count("model and calibration data") == 1
    args = parser.parse_args([*REQUIRED[name], *GIVEN])
    assert model_data_fields(args) == {"model": "m", "dtype": "fp32", "device": "cpu", "calib": "ptb",
                                       "n_calib": 3, "seqlen": 64, "seed": 7}
    defaults = model_data_fields(parser.parse_args(REQUIRED[name]))
    spec = EvaluatorSpec()
    assert defaults == {k: getattr(spec, k) for k in defaults}  # one set of defaults, the spec's


@pytest.mark.parametrize("name", ["apply", "compare", "bench"])
def test_plain_seed_is_gone_where_it_was_ambiguous(name, capsys):
    with pytest.raises(SystemExit):
        PARSERS[name]().parse_args([*REQUIRED[name], "--seed", "1"])
    assert "unrecognized arguments: --seed" in capsys.readouterr().err


def test_search_seed_is_a_deprecated_alias_of_gp_seed(capsys):
    args = search_cli.build_parser().parse_args(["--seed", "3"])
    assert args.gp_seed == 3 and args.calib_seed == 0
    assert "warning: --seed is deprecated; use --gp-seed" in capsys.readouterr().err
    args = search_cli.build_parser().parse_args(["--gp-seed", "4", "--calib-seed", "5"])
    assert (args.gp_seed, args.calib_seed) == (4, 5) and capsys.readouterr().err == ""
    assert "--seed" not in search_cli.build_parser().format_help()  # hidden: documented commands only


def test_bench_panel_seed_is_its_own_option():
    args = bench.build_parser().parse_args(["fidelity", "--panel-seed", "9", "--calib-seed", "2"])
    assert args.panel_seed == 9 and model_data_fields(args)["seed"] == 2


def test_the_group_serves_a_separate_parser():
    """What `python -m metricgp.apply --structured` builds its own parser with."""
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
