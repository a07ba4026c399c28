"""No formula text is ever executed: the package must not contain eval/exec/compile-style calls."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metricgp"
# `model.eval()` and `torch.compile(` are fine: only the bare builtins are forbidden.
FORBIDDEN = re.compile(
    r"(?<![\w.])(eval|exec|compile|__import__)\s*\(|gp\.compile|sympify|parse_expr|literal_eval"
)


def test_package_has_no_dynamic_evaluation():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, "package sources not found"
    hits = [
        f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
        for path in files
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_pattern_catches_what_it_should():
    assert FORBIDDEN.search("x = eval(text)")
    assert FORBIDDEN.search("exec (code)")
    assert FORBIDDEN.search("sympy.sympify(s)")
    assert FORBIDDEN.search("toolbox.register('compile', gp.compile)")
    assert not FORBIDDEN.search("model.eval()")
    assert not FORBIDDEN.search("compile_metric(node)")
