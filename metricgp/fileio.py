"""Files that are never half-written: every cache, checkpoint and report is written to a temporary
name beside its target and renamed onto it. The temporary name is unique per writer (process id and
a random suffix), so concurrent writers of one cache (Ray actors, two runs sharing a cache directory)
never write into each other's file; the last rename wins and every reader sees a whole file."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def unique_temporary(path: Path) -> Path:
    """A hidden sibling of `path` whose name no other writer uses."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a unique temporary path to write a file (or fill a directory) at; on success it replaces
    `path` in one rename. On error, or if another writer's directory got there first, the temporary
    is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temporary(path)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (tmp.is_dir() and path.is_dir()):  # a file is replaced; a filled directory is not
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
