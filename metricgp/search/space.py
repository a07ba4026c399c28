"""A search space as data: `search_spaces/*.yaml` -> validated, frozen `SearchSpace`.

Validation happens once, here; every problem is a `MetricGPError` naming the file, the key and
what is wrong, e.g. ``search_spaces/x.yaml: operators[3]: unknown operator 'foo' (known: ...)``.

Depths use `Node.depth()`'s convention (a lone leaf has depth 1); DEAP's "height" is depth - 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metricgp.errors import MetricGPError
from metricgp.expr import resolve_metric
from metricgp.expr.ops import LEAVES, OPERATORS
from metricgp.search.breeding import ALGORITHMS, MUTATIONS


@dataclass(frozen=True)
class Constants:
    """Ephemeral random constants: uniform in [low, high] rounded to `decimals`, or drawn from
    `values` when that list is given. Never 0 (a zero constant only makes dead subtrees)."""

    enabled: bool = False
    low: float = -2.0
    high: float = 2.0
    decimals: int = 2
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class Limits:
    init_min_depth: int = 3
    init_max_depth: int = 5
    max_depth: int = 10
    max_size: int = 40


@dataclass(frozen=True)
class GPParams:
    population: int = 50
    generations: int = 40
    algorithm: str = "steady_state"
    offspring: int = 10  # children per generation (steady state: inserted one by one; mu+lambda: lambda)
    cxpb: float = 0.5
    mutpb: float = 0.5
    tournament_size: int = 20  # individuals sampled per tournament
    tournament_keep: int = 10  # the paper's k: the best k of the sample, two parents drawn from them
    parsimony_size: float = 1.0  # > 1: selDoubleTournament with this size pressure; 1: size tie-break only
    mutations: tuple[str, ...] = tuple(MUTATIONS)
    hof_size: int = 10
    max_regenerate: int = 10  # retries for a child equivalent to a parent (OOS)
    seed: int = 0


@dataclass(frozen=True)
class Fidelity:
    """Validation windows per stage and the successive-halving rate (top 1/eta promoted)."""

    windows: tuple[int, ...] = (2, 8, 32)
    eta: int = 3


@dataclass(frozen=True)
class SearchSpace:
    name: str
    leaves: tuple[str, ...]
    operators: tuple[str, ...]
    constants: Constants = field(default_factory=Constants)
    limits: Limits = field(default_factory=Limits)
    gp: GPParams = field(default_factory=GPParams)
    fidelity: Fidelity = field(default_factory=Fidelity)
    # Built-in names or formulas placed in the initial population before the random trees
    # (known-good starting points, so a short search refines rather than rediscovers them).
    seed_metrics: tuple[str, ...] = ()
    source: str = "<memory>"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation


def _fail(where: str, key: str, problem: str) -> MetricGPError:
    return MetricGPError(f"{where}: {key}: {problem}")


def _number(where: str, key: str, value: Any, kind: type, lo: float | None = None,
            hi: float | None = None) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise _fail(where, key, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if lo is not None and value < lo:
        raise _fail(where, key, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise _fail(where, key, f"must be <= {hi}, got {value}")
    return value


def _section(where: str, key: str, raw: Any, cls: type) -> dict[str, Any]:
    """Check a mapping's keys against a dataclass's fields; return it as a dict."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(where, key, f"expected a mapping, got {type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in known:
            raise _fail(where, f"{key}.{k}", f"unknown key (known: {', '.join(known)})")
    return dict(raw)


def _names(where: str, key: str, raw: Any, table: dict, what: str) -> tuple[str, ...]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise _fail(where, key, f"expected a non-empty list of {what}s")
    out: list[str] = []
    for i, item in enumerate(raw):
        arity = None
        if isinstance(item, dict):  # {name: add, arity: 2}
            extra = set(item) - {"name", "arity"}
            if extra or "name" not in item:
                raise _fail(where, f"{key}[{i}]", "expected a name or {name: ..., arity: ...}")
            item, arity = item["name"], item.get("arity")
        if not isinstance(item, str) or item not in table:
            raise _fail(where, f"{key}[{i}]", f"unknown {what} {item!r} (known: {', '.join(table)})")
        if arity is not None and arity != table[item].arity:
            raise _fail(where, f"{key}[{i}]", f"{what} {item!r} has arity {table[item].arity}, not {arity!r}")
        if item in out:
            raise _fail(where, f"{key}[{i}]", f"duplicate {what} {item!r}")
        out.append(item)
    return tuple(out)


def _constants(where: str, raw: Any) -> Constants:
    d = _section(where, "constants", raw, Constants)
    c = Constants()
    enabled = d.get("enabled", c.enabled)
    if not isinstance(enabled, bool):
        raise _fail(where, "constants.enabled", f"expected true or false, got {enabled!r}")
    low = _number(where, "constants.low", d.get("low", c.low), float)
    high = _number(where, "constants.high", d.get("high", c.high), float)
    if enabled and not low < high:
        raise _fail(where, "constants", f"low ({low}) must be below high ({high})")
    decimals = _number(where, "constants.decimals", d.get("decimals", c.decimals), int, 0, 8)
    values = d.get("values", c.values)
    if not isinstance(values, (list, tuple)):
        raise _fail(where, "constants.values", "expected a list of numbers")
    values = tuple(_number(where, f"constants.values[{i}]", v, float) for i, v in enumerate(values))
    if 0.0 in values:
        raise _fail(where, "constants.values", "0 is not allowed (it only creates dead subtrees)")
    return Constants(enabled, low, high, decimals, values)


def _limits(where: str, raw: Any) -> Limits:
    d = _section(where, "limits", raw, Limits)
    base = Limits()
    vals = {f.name: _number(where, f"limits.{f.name}", d.get(f.name, getattr(base, f.name)), int, 1)
            for f in dataclasses.fields(Limits)}
    lim = Limits(**vals)
    if lim.init_min_depth > lim.init_max_depth:
        raise _fail(where, "limits", "init_min_depth must not exceed init_max_depth")
    if lim.init_max_depth > lim.max_depth:
        raise _fail(where, "limits", "init_max_depth must not exceed max_depth")
    return lim


def _gp(where: str, raw: Any) -> GPParams:
    d = _section(where, "gp", raw, GPParams)
    b = GPParams()
    algorithm = d.get("algorithm", b.algorithm)
    if algorithm not in ALGORITHMS:
        raise _fail(where, "gp.algorithm",
                    f"unknown algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    mutations = d.get("mutations", list(b.mutations))
    if not isinstance(mutations, (list, tuple)) or not mutations:
        raise _fail(where, "gp.mutations", "expected a non-empty list")
    for i, m in enumerate(mutations):
        if m not in MUTATIONS:
            raise _fail(where, f"gp.mutations[{i}]",
                        f"unknown mutation {m!r} (known: {', '.join(MUTATIONS)})")

    def num(key: str, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
        return _number(where, f"gp.{key}", d.get(key, getattr(b, key)), kind, lo, hi)

    g = GPParams(
        population=num("population", int, 2),
        generations=num("generations", int, 0),
        algorithm=algorithm,
        offspring=num("offspring", int, 1),
        cxpb=num("cxpb", float, 0.0, 1.0),
        mutpb=num("mutpb", float, 0.0, 1.0),
        tournament_size=num("tournament_size", int, 1),
        tournament_keep=num("tournament_keep", int, 1),
        parsimony_size=num("parsimony_size", float, 1.0, 2.0),
        mutations=tuple(mutations),
        hof_size=num("hof_size", int, 1),
        max_regenerate=num("max_regenerate", int, 0),
        seed=num("seed", int, 0),
    )
    if g.cxpb + g.mutpb <= 0:
        raise _fail(where, "gp", "cxpb + mutpb must be positive (children would copy their parents)")
    return g


def _fidelity(where: str, raw: Any) -> Fidelity:
    d = _section(where, "fidelity", raw, Fidelity)
    b = Fidelity()
    windows = d.get("windows", list(b.windows))
    if not isinstance(windows, (list, tuple)) or not windows:
        raise _fail(where, "fidelity.windows", "expected a non-empty list of window counts")
    windows = tuple(_number(where, f"fidelity.windows[{i}]", w, int, 1) for i, w in enumerate(windows))
    if list(windows) != sorted(set(windows)):
        raise _fail(where, "fidelity.windows", f"must be strictly increasing, got {list(windows)}")
    return Fidelity(windows, _number(where, "fidelity.eta", d.get("eta", b.eta), int, 1))


_TOP = ("name", "leaves", "operators", "constants", "limits", "gp", "fidelity", "seed_metrics")


def _seed_metrics(where: str, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)) or not all(isinstance(m, str) for m in raw):
        raise _fail(where, "seed_metrics", f"expected a list of metric names or formulas, got {raw!r}")
    for m in raw:
        try:
            resolve_metric(m)
        except MetricGPError as err:
            raise _fail(where, "seed_metrics", str(err)) from None
    return tuple(raw)


def space_from_dict(raw: Any, where: str = "<memory>") -> SearchSpace:
    """Validate a parsed YAML mapping into a `SearchSpace`."""
    if not isinstance(raw, dict):
        raise MetricGPError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    for k in raw:
        if k not in _TOP:
            raise _fail(where, str(k), f"unknown key (known: {', '.join(_TOP)})")
    for k in ("leaves", "operators"):
        if k not in raw:
            raise _fail(where, k, "missing")
    name = raw.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise _fail(where, "name", f"expected a non-empty string, got {name!r}")
    space = SearchSpace(
        name=name,
        leaves=_names(where, "leaves", raw["leaves"], LEAVES, "leaf"),
        operators=_names(where, "operators", raw["operators"], OPERATORS, "operator"),
        constants=_constants(where, raw.get("constants")),
        limits=_limits(where, raw.get("limits")),
        gp=_gp(where, raw.get("gp")),
        fidelity=_fidelity(where, raw.get("fidelity")),
        seed_metrics=_seed_metrics(where, raw.get("seed_metrics")),
        source=where,
    )
    if "ephemeral" in space.gp.mutations and not space.constants.enabled:
        space = dataclasses.replace(
            space, gp=dataclasses.replace(space.gp, mutations=tuple(m for m in space.gp.mutations
                                                                    if m != "ephemeral")))
    return space


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise MetricGPError(f"{path}: cannot read search space ({err.strerror or err})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise MetricGPError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    return space_from_dict(raw, str(path))


def with_overrides(space: SearchSpace, gp: dict[str, Any] | None = None,
                   fidelity: dict[str, Any] | None = None, where: str = "command line") -> SearchSpace:
    """The space with some `gp`/`fidelity` values replaced (None values ignored), re-validated."""
    raw = space.to_dict()
    raw.pop("source")
    raw["gp"].update({k: v for k, v in (gp or {}).items() if v is not None})
    raw["fidelity"].update({k: v for k, v in (fidelity or {}).items() if v is not None})
    return dataclasses.replace(space_from_dict(raw, where), source=space.source)
