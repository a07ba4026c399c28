"""Where evaluations run: in this process (serial) or on Ray actors, one evaluator per actor.

A backend takes an evaluator *factory* (a picklable zero-argument callable, e.g.
`functools.partial(build_evaluator, spec)`) and maps `(candidate, n_windows)` jobs to
`FitnessResult`s in job order. A candidate is whatever the evaluator scores: an expression tree
for the metric search, a level genome (`metricgp.darwin.fitness.Candidate`) for the level search.
An exception raised by `evaluate` never escapes: it becomes a degenerate result whose reason
names it, so one broken candidate cannot end a long search. Running out of memory is the exception:
it stops the run with a one-line error. A backend also reports the
evaluator's fidelities and simplification scope (its `scope` attribute; "tensor" without one).

Two ways to hand out work: `evaluate(jobs)` scores a batch and returns when all are done (the
synchronous searches); `submit(ticket, candidate, windows)` queues one job and `collect()` waits
for at least one to finish and returns `(ticket, result)` pairs (the asynchronous searches,
`metricgp.search.steady`): a worker that finishes gets the next queued job at once.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from metricgp.errors import MetricGPError, out_of_memory
from metricgp.evaluate import FitnessResult
from metricgp.expr.simplify import DEFAULT_SCOPE

# Out of memory is the run's fault, not the candidate's: it must stop the search, not score `inf`.
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)

Job = tuple[Any, int]  # (candidate, windows); the candidate is opaque to the backends
EvaluatorFactory = Callable[[], Any]


def evaluator_scope(evaluator: Any) -> str:
    """The simplification scope an evaluator's fitness is invariant under (see GPSearch)."""
    return getattr(evaluator, "scope", DEFAULT_SCOPE)


def safe_evaluate(evaluator: Any, candidate: Any, n_windows: int) -> FitnessResult:
    """`evaluator.evaluate`, with exceptions and non-finite values turned into degenerate results."""
    t0 = time.perf_counter()
    try:
        res = evaluator.evaluate(candidate, n_windows)
    except OUT_OF_MEMORY as err:
        raise out_of_memory(f"a search evaluation ({n_windows} windows)", err) from err
    except Exception as err:  # noqa: BLE001 - any failure of one candidate is that candidate's fault
        last = traceback.extract_tb(err.__traceback__)[-1:]
        where = f" at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno}" if last else ""
        return FitnessResult(math.inf, n_windows, f"evaluate raised {type(err).__name__}: {err}{where}",
                             time.perf_counter() - t0, 0.0)
    if not isinstance(res.fitness, (int, float)) or not math.isfinite(res.fitness):
        return FitnessResult(math.inf, res.n_windows, res.reason or "non-finite fitness", res.seconds,
                             res.sparsity)
    return res


class Backend(Protocol):
    workers: int  # evaluations that can run at once

    def fidelities(self) -> tuple[int, ...]: ...
    def scope(self) -> str: ...
    def evaluate(self, jobs: Sequence[Job]) -> list[FitnessResult]: ...
    def submit(self, ticket: int, candidate: Any, n_windows: int) -> None: ...
    def collect(self) -> list[tuple[int, FitnessResult]]: ...
    def close(self) -> None: ...


class SerialBackend:
    """Builds the evaluator on first use, in this process."""

    workers = 1

    def __init__(self, factory: EvaluatorFactory) -> None:
        self.factory = factory
        self._evaluator: Any = None
        self._queue: deque[tuple[int, Any, int]] = deque()

    @property
    def evaluator(self) -> Any:
        if self._evaluator is None:
            self._evaluator = self.factory()
        return self._evaluator

    def fidelities(self) -> tuple[int, ...]:
        return tuple(self.evaluator.fidelities)

    def scope(self) -> str:
        return evaluator_scope(self.evaluator)

    def evaluate(self, jobs: Sequence[Job]) -> list[FitnessResult]:
        # disable=None: a bar on a terminal, silence in logs and tests
        bar = tqdm(jobs, desc="candidates", unit="eval", leave=False, disable=None)
        return [safe_evaluate(self.evaluator, candidate, n) for candidate, n in bar]

    def submit(self, ticket: int, candidate: Any, n_windows: int) -> None:
        self._queue.append((ticket, candidate, n_windows))

    def collect(self) -> list[tuple[int, FitnessResult]]:
        """The oldest queued job, scored now."""
        if not self._queue:
            raise RuntimeError("collect() with no job submitted")
        ticket, candidate, n_windows = self._queue.popleft()
        return [(ticket, safe_evaluate(self.evaluator, candidate, n_windows))]

    def close(self) -> None:
        self._evaluator = None
        self._queue.clear()


class RayBackend:
    """`workers` Ray actors, each building its own evaluator from the factory once.

    Joins the cluster at `address` (or $RAY_ADDRESS: `ray start --head` on one machine, workers on the
    others), else uses a Ray instance this process already runs, else starts a local one (shut down on
    `close`). Each actor asks Ray for `gpus_per_worker` GPUs (1: its own GPU, 0.5: two actors share one);
    a cluster without enough GPUs, or an actor that asked for one and sees none, is a one-line error
    before any evaluation, never a silent run on the CPU.
    """

    def __init__(self, factory: EvaluatorFactory, workers: int = 2, gpus_per_worker: float = 0.0,
                 address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise MetricGPError("the ray backend needs the optional extra: "
                                "pip install 'metricgp[ray]'") from None
        if workers < 1:
            raise MetricGPError(f"--workers must be >= 1, got {workers}")
        if gpus_per_worker < 0:
            raise MetricGPError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
        self._ray = ray
        self.actors: list = []
        address = address or os.environ.get("RAY_ADDRESS") or None
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray and address:
            _use_ray_token()
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as err:
                raise MetricGPError(f"cannot join the Ray cluster at {address}: {err}") from None
        elif self._owns_ray:
            # address="local": a new Ray of our own, even where a `ray start` cluster runs on this machine (a
            # plain `ray.init()` would try to join that one); joining is what --ray-address is for
            ray.init(address="local", num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
        needed, available = workers * gpus_per_worker, ray.cluster_resources().get("GPU", 0.0)
        if needed > available:
            self.close()
            raise MetricGPError(f"--workers {workers} x --gpus-per-worker {gpus_per_worker:g} needs {needed:g} GPUs; "
                                f"the Ray cluster has {available:g}")

        @ray.remote(num_cpus=1, num_gpus=gpus_per_worker)
        class _EvalActor:
            def __init__(self, factory: EvaluatorFactory) -> None:
                if gpus_per_worker > 0 and not torch.cuda.is_available():
                    raise MetricGPError(f"a Ray worker asked for {gpus_per_worker:g} GPU but sees none "
                                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
                self.evaluator = factory()

            def fidelities(self) -> tuple[int, ...]:
                return tuple(self.evaluator.fidelities)

            def scope(self) -> str:
                return evaluator_scope(self.evaluator)

            def evaluate(self, candidate: Any, n_windows: int) -> FitnessResult:
                return safe_evaluate(self.evaluator, candidate, n_windows)

        self.actors = [_EvalActor.remote(factory) for _ in range(workers)]
        try:  # every actor built its evaluator (and found its GPU) before the search starts
            ray.get([actor.fidelities.remote() for actor in self.actors])
        except ray.exceptions.RayError as err:
            self.close()
            cause = getattr(err, "cause", None) or err
            raise MetricGPError(f"a Ray worker failed to start: {str(cause).strip().splitlines()[-1]}") from None
        self._home: dict[str, int] = {}  # candidate -> the actor that scored it first
        self._queue: deque[tuple[int, Any, int]] = deque()  # submitted, not yet on an actor
        self._running: dict[Any, tuple[int, int]] = {}  # object ref -> (ticket, actor)

    @property
    def workers(self) -> int:
        return len(self.actors)

    def fidelities(self) -> tuple[int, ...]:
        return self._ray.get(self.actors[0].fidelities.remote())

    def scope(self) -> str:
        return self._ray.get(self.actors[0].scope.remote())

    def evaluate(self, jobs: Sequence[Job]) -> list[FitnessResult]:
        """A candidate seen before goes back to the actor that scored it: that actor's evaluator kept
        the window losses of its earlier fidelities, so a promoted candidate runs only its new windows
        (as on the serial backend). A new candidate goes to the actor with the fewest jobs of this batch."""
        load = [0] * len(self.actors)
        futures = []
        for candidate, n_windows in jobs:
            key = str(candidate)
            if key not in self._home:
                self._home[key] = min(range(len(self.actors)), key=load.__getitem__)
            actor = self._home[key]
            load[actor] += 1
            futures.append(self.actors[actor].evaluate.remote(candidate, n_windows))
        return self._ray.get(futures)

    def submit(self, ticket: int, candidate: Any, n_windows: int) -> None:
        self._queue.append((ticket, candidate, n_windows))
        self._dispatch()

    def _dispatch(self) -> None:
        """Every idle actor takes the oldest queued job it may run: a candidate it scored before (its
        evaluator kept those windows' losses), or one no actor has seen. A promoted candidate waits
        for its own actor rather than scoring its earlier windows again elsewhere."""
        busy = {actor for _, actor in self._running.values()}
        for actor in range(len(self.actors)):
            if actor in busy:
                continue
            for i, (ticket, candidate, n_windows) in enumerate(self._queue):
                home = self._home.setdefault(str(candidate), actor)
                if home == actor:
                    del self._queue[i]
                    ref = self.actors[actor].evaluate.remote(candidate, n_windows)
                    self._running[ref] = (ticket, actor)
                    break

    def collect(self) -> list[tuple[int, FitnessResult]]:
        """Waits for the first running job to finish; returns every finished one, then refills the
        idle actors."""
        if not self._running:
            raise RuntimeError("collect() with no job running")
        ready, rest = self._ray.wait(list(self._running), num_returns=1)
        if rest:  # and whatever else has finished meanwhile, without waiting
            ready += self._ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        out = [(self._running.pop(ref)[0], self._ray.get(ref)) for ref in ready]
        self._dispatch()
        return out

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()


def _use_ray_token() -> None:
    """Ray >= 2.59's `ray start --head` turns token authentication on, and a driver whose RAY_AUTH_MODE is
    unset then fails to join it after ~20 s of retries. A driver in token mode joins clusters with or
    without authentication, so where a token is at hand (Ray's own places for it) and the user chose no
    mode, token mode is used, through Ray's own switch (it also refreshes Ray's cached config)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication: nothing to do
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _serial(factory: EvaluatorFactory, workers: int, gpus_per_worker: float, address: str | None) -> Backend:
    return SerialBackend(factory)  # one evaluator in this process: workers, GPUs and clusters do not apply


# backend name -> fn(evaluator factory, workers, gpus per worker, cluster address); one entry adds a backend.
BACKENDS: dict[str, Callable[[EvaluatorFactory, int, float, str | None], Backend]] = {
    "serial": _serial,
    "ray": RayBackend,
}


def make_backend(name: str, factory: EvaluatorFactory, workers: int = 1,
                 gpus_per_worker: float = 0.0, address: str | None = None) -> Backend:
    if name not in BACKENDS:
        raise MetricGPError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name](factory, workers, gpus_per_worker, address)
