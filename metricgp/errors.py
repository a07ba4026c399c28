"""User-facing errors: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., int])


class MetricGPError(ValueError):
    """A problem with what the user asked for (bad path, formula, sparsity, config ...)."""


class OutOfMemory(MetricGPError):
    """A phase asked for more memory than the device or host has. The run stops with this one line;
    it is never turned into a bad score (a search that ran out of memory would prefer small formulas)."""


def out_of_memory(phase: str, err: BaseException) -> OutOfMemory:
    """The one-line error for an out-of-memory `err` raised in `phase`, with the size it asked for."""
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", str(err))
    size = f", asked for {asked.group(1)}" if asked else ""
    return OutOfMemory(f"out of memory in {phase}{size}: use a smaller batch or fewer windows, --dtype bfloat16, "
                       "or a device with more memory")


def cli_entry(main: F) -> F:
    """Wrap a command-line `main` so user errors print one line and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except MetricGPError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]
