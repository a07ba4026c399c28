"""Metric expressions: tree, operator table, parser, printers, compiler, simplifier, built-ins."""

from metricgp.expr.builtins import BUILTIN_METRICS, formula_from_file, resolve_metric
from metricgp.expr.compile import compile_metric
from metricgp.expr.ops import LEAVES, OPERATORS
from metricgp.expr.parse import FormulaError, parse
from metricgp.expr.printing import to_functional, to_infix, to_latex, to_sympy
from metricgp.expr.randomtree import random_tree
from metricgp.expr.simplify import RANK_RULES, RULES, SCOPES, canonical_key, describe, simplify
from metricgp.expr.tree import CONST, Node, call, const, leaf

__all__ = [
    "BUILTIN_METRICS", "CONST", "LEAVES", "OPERATORS", "RANK_RULES", "RULES", "SCOPES", "FormulaError", "Node",
    "call", "canonical_key", "formula_from_file", "compile_metric", "const", "describe", "leaf", "parse", "random_tree",
    "resolve_metric", "simplify", "to_functional", "to_infix", "to_latex", "to_sympy",
]
