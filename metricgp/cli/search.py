"""`python -m metricgp.search`: evolve a pruning metric, or resume a run.

    python -m metricgp.search --space search_spaces/pruner_zero.yaml --sparsity 0.5 \\
        --pattern unstructured --population 50 --generations 40 --search-seed 0 --out runs/pz-s0
    python -m metricgp.search --resume runs/pz-s0
    python -m metricgp.search --evaluator synthetic --space search_spaces/tiny.yaml --out runs/demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from metricgp.cli.options import (
    add_backend_options,
    add_model_data_options,
    add_pattern_options,
    backend_fields,
    deprecated_alias,
    model_data_fields,
    pattern_from_args,
    resume_overrides,
    split_metrics,
)
from metricgp.errors import MetricGPError, cli_entry
from metricgp.evaluate import FITNESSES
from metricgp.expr.builtins import resolve_metric
from metricgp.expr.parse import FormulaError
from metricgp.provenance import provenance
from metricgp.search.breeding import ALGORITHMS
from metricgp.search.run import EVALUATORS, RESUMABLE, RunConfig, resume, start
from metricgp.search.space import load_space, with_overrides
from metricgp.structured.evaluator import StructuredSpec

DEFAULT_SPACE = "search_spaces/pruner_zero.yaml"


def _fidelities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated window counts, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one window count")
    return values


def _references(text: str) -> tuple[str, ...]:
    names = split_metrics(text)
    for name in names:
        try:
            resolve_metric(name)
        except FormulaError as err:
            raise argparse.ArgumentTypeError(f"reference {name!r}: {err}") from None
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.search", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default=DEFAULT_SPACE, help=f"search space YAML (default {DEFAULT_SPACE})")
    p.add_argument("--out", type=Path, help="run directory (default runs/<space name>-s<seed>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its checkpoint")
    g = p.add_argument_group("search (override the space's gp/fidelity sections)")
    g.add_argument("--population", type=int)
    g.add_argument("--generations", type=int)
    g.add_argument("--offspring", type=int, help="children per generation")
    g.add_argument("--algorithm", choices=tuple(ALGORITHMS))
    g.add_argument("--search-seed", type=int, help="seed of the search's random choices (the space's gp.seed)")
    deprecated_alias(g, "--seed", "--search-seed", dest="search_seed", type=int)  # documented in README.md
    deprecated_alias(g, "--gp-seed", "--search-seed", dest="search_seed", type=int)  # the Makefile's search-long
    g.add_argument("--fidelities", type=_fidelities, help="validation windows per stage, e.g. 2,8,32")
    g.add_argument("--eta", type=int, help="successive halving: promote the top 1/eta")
    g.add_argument("--time-budget", type=float, metavar="MIN",
                   help="stop after the generation that exceeds this many minutes")
    e = p.add_argument_group("evaluator")
    e.add_argument("--evaluator", choices=tuple(EVALUATORS), default="model",
                   help="model: prune a language model, fitness on validation text (default); refit: output "
                   "residual after reconstruct mode's least-squares refit, fidelity = decoder blocks sampled "
                   "(--fidelities 2,4,8); synthetic: model-free demo")
    e.add_argument("--fitness-data", default="wikitext2", help="fitness data (validation split; never a test split)")
    deprecated_alias(e, "--valid", "--fitness-data", dest="fitness_data")
    add_pattern_options(e)
    e.add_argument("--fitness", choices=tuple(FITNESSES), default="ppl")
    e.add_argument("--structured", action="store_true",
                   help="evolve a metric for structured pruning: fitness of the model with the heads and "
                   "channels the metric ranks lowest removed (same evaluator as apply --structured)")
    e.add_argument("--keep", type=float, default=None, help="--structured: fraction of decoder parameters kept")
    for opt in ("reduction", "normalisation", "allocation", "head-mode"):
        e.add_argument(f"--{opt}", default=None, help=f"--structured: the evaluator's {opt} (default: its own)")
    e.add_argument("--references", type=_references, default=(), metavar="M,M,...",
                   help="metrics (built-in names or formulas) scored on the search's own windows at every "
                   "fidelity, outside the population: the log and README compare each generation's best "
                   "with them (e.g. wanda,gblm for a search from scratch)")
    e.add_argument("--synthetic-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    # --calib-seed is kept apart from --search-seed, so that runs with different search seeds optimise
    # the same fitness (the synthetic evaluator draws its layers from it)
    add_model_data_options(p)
    add_backend_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def evaluator_spec(args: argparse.Namespace, fidelities: tuple[int, ...]) -> dict[str, Any]:
    """The evaluator's spec fields from the command line (model wiring lives here and in
    `run.evaluator_factory`); the pattern is parsed and validated once, here, and the spec holds
    its resolved name and sparsity (so the run's summary states what was searched)."""
    if args.structured:
        return {**model_data_fields(args), "valid": args.fitness_data, "fitness": args.fitness,
                "fidelities": fidelities, "structured": structured_fields(args)}
    pattern = pattern_from_args(args)
    if args.evaluator == "synthetic":
        return {"seed": args.calib_seed, "sparsity": pattern.sparsity, "fidelities": fidelities,
                "delay": args.synthetic_delay}
    return {**model_data_fields(args), "valid": args.fitness_data, "sparsity": pattern.sparsity,
            "pattern": pattern.name, "fitness": args.fitness, "fidelities": fidelities}


def structured_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The StructuredSpec fields given on the command line, validated."""
    if args.pattern != "unstructured" or args.sparsity is not None:
        raise MetricGPError("--structured sets its size with --keep, not --pattern/--sparsity")
    fields = {"keep": 0.7 if args.keep is None else args.keep}
    for opt in ("reduction", "normalisation", "allocation", "head_mode"):
        if getattr(args, opt) is not None:
            fields[opt] = getattr(args, opt)
    StructuredSpec(**fields).validate()
    return fields


def _fresh(args: argparse.Namespace) -> RunConfig:
    space = load_space(args.space)
    space = with_overrides(
        space,
        gp={"population": args.population, "generations": args.generations, "offspring": args.offspring,
            "algorithm": args.algorithm, "seed": args.search_seed},
        fidelity={"windows": args.fidelities, "eta": args.eta},
    )
    name = (args.out.name if args.out else f"{space.name}-s{space.gp.seed}")
    if args.keep is not None and not args.structured:
        raise MetricGPError("--keep needs --structured")
    return RunConfig(space=space, evaluator="structured" if args.structured else args.evaluator,
                     evaluator_spec=evaluator_spec(args, tuple(space.fidelity.windows)),
                     **backend_fields(args), time_budget_min=args.time_budget, name=name,
                     references=args.references)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.no_progress
    if args.resume is not None:
        search = resume(args.resume, resume_overrides(parser, args, RESUMABLE), progress=progress)
        run_dir = args.resume
    else:
        config = _fresh(args)
        run_dir = args.out or Path("runs") / config.name
        search = start(config, run_dir, provenance(), progress=progress)
    best = search.hof[0] if len(search.hof) else None
    if best is not None:
        print(f"best: {best.node}  fitness {best.fitness.values[1]:.6g} "
              f"on {search.fidelities[int(best.fitness.values[0])]} windows  ->  {run_dir}/best.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
