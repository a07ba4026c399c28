"""Checkpoints: one pickle per run directory, replaced atomically after every generation.

Pickle is used because the state holds RNG states (tuples, numpy arrays, a torch tensor); the
file is our own. **Only load checkpoints written by your own runs**: unpickling runs code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from metricgp.errors import MetricGPError
from metricgp.fileio import atomic_path

CHECKPOINT = "checkpoint.pkl"
VERSION = 1


def save_checkpoint(run_dir: Path, config: dict[str, Any], search_state: dict[str, Any]) -> Path:
    """Write `run_dir/checkpoint.pkl` via a temporary file and os.replace (never half-written)."""
    path = Path(run_dir) / CHECKPOINT
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        pickle.dump({"version": VERSION, "config": config, "search": search_state}, fh,
                    protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """{"config": ..., "search": ...} from a run directory of ours."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise MetricGPError(f"{run_dir}: no {CHECKPOINT} to resume from")
    try:
        with open(path, "rb") as fh:
            payload = pickle.load(fh)  # noqa: S301 - our own file, see the module doc
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise MetricGPError(f"{path}: cannot read checkpoint ({err})") from None
    if not isinstance(payload, dict) or payload.get("version") != VERSION:
        raise MetricGPError(f"{path}: not a checkpoint of this metricgp version")
    return payload
