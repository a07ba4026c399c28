"""The recorded command is what a user would type, for modules at any depth of the package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import metricgp.provenance as provenance

ROOT = Path(provenance.__file__).resolve().parent


@pytest.mark.parametrize(("argv0", "head"), [
    (ROOT / "apply.py", "python -m metricgp.apply"),
    (ROOT / "search" / "__main__.py", "python -m metricgp.search"),
    (ROOT / "structured" / "experiments.py", "python -m metricgp.structured.experiments"),
    (Path("/usr/local/bin/somewhere"), "/usr/local/bin/somewhere"),
])
def test_command_line(monkeypatch, argv0, head):
    monkeypatch.setattr(sys, "argv", [str(argv0), "--out", "a b"])
    assert provenance.command_line() == f"{head} --out 'a b'"


def test_command_line_writes_paths_under_the_working_directory_relative(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "compare.py"), "--run", str(tmp_path / "results" / "r"),
                                      "--reuse", "/elsewhere/report.json"])
    assert provenance.command_line() == "python -m metricgp.compare --run results/r --reuse /elsewhere/report.json"


def test_provenance_records_the_thread_count(monkeypatch):
    """A result records the thread count it ran with (the first thing to match when a cell does not reproduce)."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert provenance.provenance()["torch_threads"] == 1
        torch.set_num_threads(2)
        assert provenance.provenance()["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)
