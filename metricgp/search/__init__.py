"""Genetic-programming search for pruning metrics (Pruner-Zero style), with OOS, multi-fidelity
successive halving, exact checkpoint/resume, and serial or Ray evaluation.

    space.py      search-space YAML -> validated `SearchSpace`
    trees.py      DEAP primitive set, individual/fitness types, PrimitiveTree <-> Node
    oos.py        simplification + canonical key of a child
    staged.py     fitness cache and the successive-halving race of a cohort
    gp.py         the GP strategy (steady state, mu+lambda)
    backends.py   serial and Ray evaluation
    synthetic.py  a model-free evaluator for tests and demos
    checkpoint.py, artifacts.py, run.py, __main__.py   run directory, CLI
"""

from metricgp.search.gp import GPSearch
from metricgp.search.run import RunConfig, evaluator_factory, resume, start
from metricgp.search.space import SearchSpace, load_space, space_from_dict, with_overrides

__all__ = ["GPSearch", "RunConfig", "SearchSpace", "evaluator_factory", "load_space", "resume",
           "space_from_dict", "start", "with_overrides"]
