"""Zero-shot accuracy through lm-evaluation-harness, on a model in memory (dense, masked or shrunk).

    zs = ZeroShot.parse("boolq,rte,hellaswag", limit=100)   # task names, or local task directories/YAMLs
    zs.check()                                   # lm-eval present, every task known and loadable: before work
    dense = zs.evaluate(model, tokenizer)        # {"tasks": {...}, "mean": {...}, "versions": ..., ...}
    ...prune...
    report = zero_shot_report(zs, {"dense": dense, "pruned": zs.evaluate(model, tokenizer)})
    print("\\n".join(table_lines(report)))

The model is wrapped as it is in lm-eval's `HFLM(pretrained=model, tokenizer=...)`: a pruned model is
never saved and reloaded, and a structured model with per-layer widths is evaluated as it stands.

Like for like: every task's `acc` and `acc_norm` (where the task defines it) come from the same run
and are never mixed; each has its own mean (acc over all tasks, acc_norm over the tasks that have it,
each naming its tasks). A group (e.g. mmlu) counts once, with lm-eval's own aggregate; a group without
one counts as its subtasks, a tag (e.g. ai2_arc) as its tasks. Few-shot is 0; the lm-eval version,
task versions, few-shot counts and the limit are recorded beside the numbers.

Local tasks: an item of the task list that is an existing directory or YAML file is scanned with
lm-eval's `include_path`, and every task (or group) it defines is run; a list of local tasks only
does not index lm-eval's built-in tasks, so nothing is looked up on the hub.

lm_eval is imported inside functions: it is an optional extra (`pip install 'metricgp[eval]'`), slow
to import, and a run without zero-shot evaluation never needs it.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metricgp.errors import MetricGPError

EXTRA = "pip install 'metricgp[eval]'"
NUM_FEWSHOT = 0
METRICS = ("acc", "acc_norm")  # reported side by side, never one in place of the other
PAPER_SUITE = "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"  # Wanda, SparseGPT, Pruner-Zero


def lm_eval_version() -> str:
    """The installed lm-eval's version; a one-line error naming the extra when it is missing."""
    try:
        import lm_eval
    except ImportError:
        raise MetricGPError(f"--zero-shot needs lm-evaluation-harness, an optional extra: {EXTRA}") from None
    return lm_eval.__version__


@dataclass
class ZeroShot:
    """Which tasks, how many items of each (`limit`: the first N; None: all), at which batch size."""

    tasks: str  # as given: comma-separated names and/or local directories/YAML files
    limit: int | None = None
    batch_size: int = 1
    _manager: Any = field(default=None, init=False, repr=False)
    _names: list[str] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def from_options(cls, tasks: str | None, limit: int | None = None, batch_size: int = 1,
                     check: bool = False) -> ZeroShot | None:
        """`parse` of the command-line options (--zero-shot, --zero-shot-limit, --zero-shot-batch-size),
        and `check` with `check`; None without tasks, where a limit or batch size alone is an error."""
        if tasks is None:
            if limit is not None or batch_size != 1:
                raise MetricGPError("--zero-shot-limit and --zero-shot-batch-size need --zero-shot TASKS")
            return None
        zs = cls.parse(tasks, limit, batch_size)
        if check:
            zs.check()
        return zs

    @classmethod
    def parse(cls, tasks: str, limit: int | None = None, batch_size: int = 1) -> ZeroShot:
        if not [t for t in tasks.split(",") if t.strip()]:
            raise MetricGPError("--zero-shot names no task")
        if limit is not None and limit < 1:
            raise MetricGPError(f"--zero-shot-limit must be at least 1, got {limit}")
        if batch_size < 1:
            raise MetricGPError(f"--zero-shot-batch-size must be at least 1, got {batch_size}")
        return cls(tasks, limit, batch_size)

    def _items(self) -> tuple[list[str], list[Path]]:
        """(task names, local paths): an item that exists on disk is a path."""
        names, paths = [], []
        for item in (t.strip() for t in self.tasks.split(",") if t.strip()):
            path = Path(item).expanduser()
            if path.exists():
                if path.is_file() and path.suffix != ".yaml":
                    raise MetricGPError(f"--zero-shot {item}: a local task is a directory or a .yaml file")
                paths.append(path.resolve())
            elif item.endswith((".yaml", ".yml")) or "/" in item:
                raise MetricGPError(f"--zero-shot {item}: no such file or directory")
            else:
                names.append(item)
        return names, paths

    def check(self) -> list[str]:
        """Everything that can fail, before any slow work: lm-eval installed, every name known, every
        task built (its data found: downloaded once into the datasets cache, or read from local files).
        Returns the tasks run, in order."""
        if self._manager is not None:
            return self._names
        lm_eval_version()
        from lm_eval.tasks import TaskManager

        names, paths = self._items()
        include = sorted({str(p if p.is_dir() else p.parent) for p in paths})
        manager = TaskManager(include_path=include or None, include_defaults=bool(names))
        index = manager.task_index
        unknown = [n for n in names if n not in index]
        if unknown:
            raise MetricGPError(f"--zero-shot: unknown task {', '.join(unknown)} (lm-eval's task names, e.g. "
                                f"{PAPER_SUITE}; or a local task directory or YAML file)")
        chosen: list[str] = []
        for name in names:  # a tag stands for its tasks: each is then reported and averaged on its own
            chosen += sorted(index[name].tags) if name in manager.all_tags else [name]
        for path in paths:
            chosen += _local_tasks(index, path)
        chosen = list(dict.fromkeys(chosen))
        try:
            manager.load(chosen)
        except Exception as err:  # noqa: BLE001 - lm-eval and datasets raise many kinds (no network, bad YAML)
            first = (str(err).strip().splitlines() or [""])[0]  # one line, as every user error
            raise MetricGPError(f"--zero-shot: could not load the tasks {', '.join(chosen)}: "
                                f"{type(err).__name__}: {first}") from None
        self._manager, self._names = manager, chosen
        return chosen

    def settings(self) -> dict[str, Any]:
        return {"lm_eval": lm_eval_version(), "tasks": self.tasks, "tasks_run": self.check(),
                "num_fewshot": NUM_FEWSHOT, "limit": self.limit, "batch_size": self.batch_size}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tokenizer) -> dict[str, Any]:
        """Every task's acc and acc_norm (with their standard errors and the items scored), their means,
        the task versions and few-shot counts, and the seconds it took. `model` is not copied or moved:
        lm-eval runs it on its own device; `tokenizer` is copied (lm-eval may give it a pad token)."""
        names = self.check()
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        t0 = time.perf_counter()
        was_training = model.training
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal",
                  batch_size=self.batch_size)
        with _rng_kept():  # lm-eval seeds the global generators; what runs after it must not notice
            out = simple_evaluate(model=lm, tasks=names, num_fewshot=NUM_FEWSHOT, limit=self.limit,
                                  batch_size=self.batch_size, task_manager=self._manager, log_samples=False)
        model.train(was_training)
        return {**summarise(out, names), "seconds": round(time.perf_counter() - t0, 2)}


def _local_tasks(index: dict, path: Path) -> list[str]:
    """The tasks and groups a local directory or YAML file defines, less the tasks its groups hold."""
    def inside(entry) -> bool:
        where = getattr(entry, "yaml_path", None)
        return where is not None and (Path(where).resolve() == path or path in Path(where).resolve().parents)

    found = {name: e for name, e in index.items() if inside(e) and getattr(e, "cfg", None) is not None}
    grouped = {t for e in found.values() if "group" in e.cfg for t in _listed(e.cfg.get("task"))}
    names = [name for name in found if name not in grouped]
    if not names:
        raise MetricGPError(f"--zero-shot {path}: defines no lm-eval task (a YAML file with a 'task' key)")
    return names


def _listed(tasks: Any) -> list[str]:
    items = tasks if isinstance(tasks, list) else [tasks]
    return [t if isinstance(t, str) else t.get("task", "") for t in items if isinstance(t, (str, dict))]


@contextmanager
def _rng_kept():
    """Python's, numpy's and torch's global random states restored on exit (simple_evaluate seeds them)."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def summarise(out: dict, names: list[str]) -> dict[str, Any]:
    """lm-eval's results for the tasks `names` -> per-task acc/acc_norm and their separate means.

    A name lm-eval reports without acc because it is a group without an aggregate is replaced by its
    subtasks (`group_subtasks`), so every mean is over the tasks as the user counts them."""
    entries = {**out.get("results", {}), **out.get("groups", {})}
    subtasks = out.get("group_subtasks", {})

    def units(name: str) -> list[str]:
        if name in subtasks and "acc,none" not in entries.get(name, {}):
            return [u for child in subtasks[name] for u in units(child)]
        return [name]

    counted = list(dict.fromkeys(u for n in names for u in units(n)))
    tasks: dict[str, dict] = {}
    for name in counted:
        entry = entries.get(name, {})
        row: dict[str, Any] = {}
        for metric in METRICS:
            if f"{metric},none" in entry:
                row[metric] = _number(entry[f"{metric},none"])
                row[f"{metric}_stderr"] = _number(entry.get(f"{metric}_stderr,none"))
        samples = out.get("n-samples", {}).get(name, {})
        row["items"] = samples.get("effective") if isinstance(samples, dict) else None
        row["group"] = name in subtasks
        tasks[name] = row
    mean = {}
    for metric in METRICS:
        having = [t for t in counted if tasks[t].get(metric) is not None]
        mean[metric] = {"value": sum(tasks[t][metric] for t in having) / len(having) if having else None,
                        "tasks": having}
    return {"tasks": tasks, "mean": mean, "versions": {n: out.get("versions", {}).get(n) for n in counted},
            "n_shot": {n: out.get("n-shot", {}).get(n) for n in counted}}


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" for a standard error it did not compute."""
    return float(value) if isinstance(value, (int, float)) else None


def zero_shot_report(zs: ZeroShot, results: dict[str, dict]) -> dict[str, Any]:
    """The report's `zero_shot` block: the settings once, then each model's results by label
    (dense, pruned, recovered ...). Task versions and few-shot counts are the first result's (one
    lm-eval, one task list: they are the same for every model)."""
    first = next(iter(results.values()), {})
    return {**zs.settings(), "task_versions": first.get("versions", {}), "n_shot": first.get("n_shot", {}),
            "models": {label: {k: r[k] for k in ("tasks", "mean", "seconds") if k in r}
                       for label, r in results.items()}}


def table_lines(report: dict[str, Any]) -> list[str]:
    """A markdown table of a `zero_shot_report`: one row per model; each task's acc, the acc mean,
    then each task's acc_norm and the acc_norm mean, under a line saying how it was measured."""
    models = report["models"]
    if not models:
        return []
    tasks = list(next(iter(models.values()))["tasks"])
    has = {m: [t for t in tasks if any(r["tasks"].get(t, {}).get(m) is not None for r in models.values())]
           for m in METRICS}
    limit = f"first {report['limit']} items of each task" if report["limit"] else "all items"
    lines = [f"Zero-shot accuracy (lm-eval {report['lm_eval']}, {report['num_fewshot']}-shot, {limit}). "
             "acc and acc_norm are separate columns, each with its own mean: "
             + ", ".join(f"{m} over {_tasks(has[m])}" for m in METRICS) + ".", ""]
    columns = [(m, t) for m in METRICS for t in [*has[m], None]]
    lines.append("| model | " + " | ".join(f"{t} {m}" if t else f"mean {m}" for m, t in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for label, r in models.items():
        cells = [r["tasks"].get(t, {}).get(m) if t else r["mean"][m]["value"] for m, t in columns]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in cells) + " |")
    return lines


def zero_shot_lines(report: dict[str, Any]) -> list[str]:
    """A command's printed summary of its report's `zero_shot` block: a blank line and the table (none
    without one)."""
    return ["", *table_lines(report["zero_shot"])] if report.get("zero_shot") else []


def _tasks(names: list[str]) -> str:
    return f"{len(names)} task{'' if len(names) == 1 else 's'} ({', '.join(names) or 'none'})"
