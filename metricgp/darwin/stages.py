"""Staged selection (EvoPress; training-aware in DarwinLM): many offspring on few tokens, few on many.

A schedule is a list of `Stage(survivors, windows, train_tokens)`. Stage k scores its candidates
on the first `windows` fitness windows (after `train_tokens` of fine-tuning each, when > 0) and
keeps the best `survivors`. The first stage scores every offspring sent to it; each next stage
scores the previous stage's survivors; the parent joins before the last stage (as in EvoPress),
which keeps one: the next parent. Ties go to the earlier candidate, and the parent comes first,
so an offspring must be strictly better to replace it.

Fitness values are cached by (genome, stage): evaluation is deterministic, so the parent's score
at the last stage is computed once, and a checkpoint holding the cache resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from metricgp.darwin.levels import Genome
from metricgp.errors import MetricGPError


@dataclass(frozen=True)
class Stage:
    survivors: int
    windows: int
    train_tokens: int = 0


def _ints(text: str | Sequence[int], flag: str) -> list[int]:
    if isinstance(text, str):
        try:
            return [int(float(v)) for v in text.replace("k", "e3").split(",") if v.strip()]
        except ValueError:
            raise MetricGPError(f"{flag} expects comma-separated integers, got {text!r}") from None
    return [int(v) for v in text]


def make_schedule(survivors: str | Sequence[int], windows: str | Sequence[int],
                  train_tokens: str | Sequence[int] | None = None) -> tuple[Stage, ...]:
    """Validated stages: survivors strictly decreasing to 1, windows non-decreasing, tokens >= 0.
    Accepts "4,2,1"-style text (tokens may say "2k")."""
    surv, wins = _ints(survivors, "--survivors"), _ints(windows, "--fitness-windows")
    toks = [0] * len(surv) if train_tokens is None else _ints(train_tokens, "--train-tokens")
    if not surv or len(surv) != len(wins) or len(surv) != len(toks):
        raise MetricGPError(f"the stage schedule needs one survivor count, window count and training budget per "
                            f"stage; got {len(surv)}, {len(wins)} and {len(toks)}")
    if surv[-1] != 1 or any(a <= b for a, b in zip(surv, surv[1:], strict=False)) or min(surv) < 1:
        raise MetricGPError(f"--survivors must decrease strictly to 1, got {surv}")
    if min(wins) < 1 or any(a > b for a, b in zip(wins, wins[1:], strict=False)):
        raise MetricGPError(f"--fitness-windows must be positive and non-decreasing, got {wins}")
    if min(toks) < 0:
        raise MetricGPError(f"--train-tokens must be >= 0, got {toks}")
    return tuple(Stage(s, w, t) for s, w, t in zip(surv, wins, toks, strict=True))


def schedule_dict(stages: Sequence[Stage]) -> list[dict]:
    return [asdict(s) for s in stages]


# (genomes, stage index) -> fitness of each (lower is better)
Scorer = Callable[[list[Genome], int], list[float]]


@dataclass
class Selection:
    winner: Genome
    fitness: float  # the winner's value at the last stage
    evaluated: list[list[tuple[Genome, float]]] = field(default_factory=list)  # per stage, as scored
    new_evaluations: list[int] = field(default_factory=list)  # per stage, cache misses


def select(offspring: Sequence[Genome], parent: Genome, stages: Sequence[Stage], score: Scorer,
           cache: dict[tuple[Genome, int], float]) -> Selection:
    """Run the schedule (see the module doc); `score` is called once per stage with the cache misses."""
    sel = Selection(parent, float("inf"))
    alive = list(offspring)
    for k, stage in enumerate(stages):
        if k == len(stages) - 1:
            alive = [parent] + [g for g in alive if g != parent]
        todo = [g for g in dict.fromkeys(alive) if (g, k) not in cache]
        for g, value in zip(todo, score(todo, k) if todo else [], strict=True):
            cache[(g, k)] = value
        sel.new_evaluations.append(len(todo))
        scored = [(g, cache[(g, k)]) for g in alive]
        sel.evaluated.append(scored)
        ranked = sorted(range(len(scored)), key=lambda i: (scored[i][1], i))
        alive = [scored[i][0] for i in ranked[: stage.survivors]]
    sel.winner = alive[0]
    sel.fitness = cache[(sel.winner, len(stages) - 1)]
    return sel
