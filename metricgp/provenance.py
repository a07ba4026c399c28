"""What every result records about how it was made: command, versions, git commit, time."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metricgp.fileio import atomic_path


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for pkg in ("transformers", "deap", "sympy", "metricgp"):
        try:
            from importlib.metadata import version

            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is recorded as absent
            out[pkg] = "absent"
    return out


def command_line() -> str:
    """The command as a user would type it: `python -m metricgp.<module>` for our own modules."""
    prog = Path(sys.argv[0]).resolve()
    package = Path(__file__).resolve().parent
    head = shlex.quote(sys.argv[0])
    if prog.is_relative_to(package):
        parts = ["metricgp", *prog.relative_to(package).with_suffix("").parts]
        head = "python -m " + ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
    return " ".join([head, *(shlex.quote(_portable(arg)) for arg in sys.argv[1:])])


def _portable(arg: str) -> str:
    """An absolute path under the working directory, written relative to it (so a command copied
    from a report runs in any checkout); anything else unchanged."""
    if not arg.startswith("/"):
        return arg
    try:
        return str(Path(arg).relative_to(Path.cwd()))
    except ValueError:
        return arg


def provenance() -> dict:
    return {
        "command": command_line(),
        "git": git_sha(),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        # a CPU reduction may split its partial sums by thread, so a cell that does not reproduce is first
        # rerun at the same count (results/baselines/rerun-2026-12-06 had to establish it after the fact)
        "torch_threads": torch.get_num_threads(),
    }


def json_safe(obj: Any) -> Any:
    """A copy that strict JSON can hold: non-finite floats (inf, nan) -> None, tuples -> lists,
    dict keys -> str, anything else unknown -> str. Every JSON file we write goes through it, so
    none contains `Infinity` or `NaN` (not JSON; many parsers refuse them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def dumps(payload: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `json_safe(payload)`."""
    return json.dumps(json_safe(payload), indent=indent, allow_nan=False)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write strict JSON (non-finite numbers as null) via a temporary file and os.replace."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(payload) + "\n", encoding="utf-8")
