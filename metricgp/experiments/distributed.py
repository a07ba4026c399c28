"""`make bench-distributed`: the metric search on a real local Ray cluster, against serial.

    python -m metricgp.experiments.distributed --out results/distributed
    python -m metricgp.experiments.distributed --generations 4 --out /tmp/d     # a quick look

A cluster is started the way a user starts one (`ray start --head` on 127.0.0.1, here with `--block`
in a child process) and every Ray run joins it with `--ray-address`. Each configuration (serial;
Ray with 1 and 2 workers; synchronous and asynchronous dispatch) runs the same search: the default
search space with the synthetic evaluator, whose cost imitates a real evaluation by sleeping a
fixed time per candidate plus a time per window not run before, times a per-candidate straggler
factor (so the runs measure scheduling, not this 2-core CPU's contention). From each run's log:
evaluations and windows run per hour, and the worker idle share, 1 - evaluation seconds /
(workers x wall seconds) over the generations after the first.

`model_rows` is the throughput model of results/distributed/README.md: the synchronous generation
time is the sum over stages of ceil(jobs / workers) x the stage's job time; the asynchronous one
is total job time / workers, or the driver's time per generation where that is longer (no barrier).
It is printed next to the measurement it predicts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import provenance, write_json_atomic
from metricgp.search.run import RunConfig, start
from metricgp.search.space import load_space, with_overrides

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "search_spaces" / "default.yaml"
# name -> (backend, workers, dispatch)
CONFIGS = {"serial": ("serial", 1, "sync"), "ray-1-sync": ("ray", 1, "sync"), "ray-1-async": ("ray", 1, "async"),
           "ray-2-sync": ("ray", 2, "sync"), "ray-2-async": ("ray", 2, "async")}


@dataclasses.dataclass(frozen=True)
class Cost:
    """The synthetic evaluator's imitation of a real evaluation's time."""

    per_candidate: float = 0.03  # scoring and masking, seconds
    per_window: float = 0.05  # one new validation window's forward pass, seconds
    jitter: float = 0.5  # straggler factor exp(jitter * z), z standard normal per candidate

    def spec(self, fidelities: tuple[int, ...]) -> dict[str, Any]:
        return {"fidelities": fidelities, "delay": self.per_candidate, "delay_per_window": self.per_window,
                "delay_jitter": self.jitter}


# An estimate, not a measurement (no GPU was lent to the sessions that wrote this): a Llama-3.1-8B
# candidate on one H100 in bf16. A 512-token window's forward is 2 x 8e9 x 512 FLOP = 8.2 TFLOP, at
# 40% of the H100's 989 TFLOP/s dense bf16 about 21 ms; scoring, masking and restoring read and write
# the 16 GB of weights (and the statistics the formula uses) about three times at ~2 TB/s: ~25 ms.
H100_8B_ESTIMATE = Cost(per_candidate=0.025, per_window=0.021, jitter=0.0)
H100_8B_BASIS = ("estimated from FLOPs and memory traffic (see metricgp/experiments/distributed.py), "
                 "not measured: replace with `make gpu-check`'s per-evaluation seconds where one was run")


@contextlib.contextmanager
def local_head(num_cpus: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """`ray start --head --block` on 127.0.0.1 in a child process; yields its address. Stopped by signal
    (`ray stop` would stop every Ray on the machine), and the machine's "current cluster" record that
    `ray start` writes is removed again, as `ray stop` does, so a later `ray.init()` does not try to join
    the dead address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    had_mode = "RAY_AUTH_MODE" in os.environ
    try:
        deadline = time.monotonic() + 90
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not open port {port}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        if not had_mode:  # joining may have switched this process to token mode
            os.environ.pop("RAY_AUTH_MODE", None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def summarize(run_dir: Path, workers: int) -> dict[str, Any]:
    """Throughput and idle share over the generations after the initial population."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()][1:]
    wall = sum(r["seconds"] for r in log)
    busy = sum(r["eval_seconds"] for r in log)
    evaluations = sum(sum(r["evaluations_per_fidelity"].values()) for r in log)
    windows_run = sum(r["windows_run"] or 0 for r in log)
    return {"generations": len(log), "wall_seconds": round(wall, 3), "evaluations": evaluations,
            "windows_run": windows_run, "evaluations_per_hour": round(3600 * evaluations / wall, 1),
            "windows_per_hour": round(3600 * windows_run / wall, 1),
            "worker_idle_share": round(1 - busy / (workers * wall), 4), "best_fitness": log[-1]["best_fitness"],
            # serial: everything that is not evaluation is the driver's (breeding, simplification, bookkeeping)
            "driver_seconds_per_generation": round((wall - busy) / len(log), 4) if workers == 1 else None,
            "idle_share_per_generation": [r["worker_idle_share"] for r in log]}


def model_rows(fidelities: tuple[int, ...], offspring: int, eta: int, cost: Cost,
               workers: tuple[int, ...] = (1, 2, 4, 8, 16, 64), driver: float = 0.0) -> list[dict[str, Any]]:
    """Predicted evaluations per hour (no stragglers): stage s races ceil(offspring / eta^s) jobs, each
    running fidelities[s] - fidelities[s-1] new windows; the driver spends `driver` seconds per
    generation, between generations when synchronous, beside the workers when asynchronous (where
    nothing waits for the longest job: `lag` jobs ahead keep the other workers busy)."""
    jobs, times = [], []
    for s, n in enumerate(fidelities):
        jobs.append(math.ceil(offspring / eta ** s))
        times.append(cost.per_candidate + cost.per_window * (n - (fidelities[s - 1] if s else 0)))
    total_jobs, total_time = sum(jobs), sum(j * t for j, t in zip(jobs, times, strict=True))
    rows = []
    for w in workers:
        sync = sum(math.ceil(j / w) * t for j, t in zip(jobs, times, strict=True)) + driver
        asynchronous = max(total_time / w, driver)  # no barrier: bounded by the driver only
        rows.append({"workers": w, "work_seconds_per_generation": round(total_time, 4),
                     "sync_evaluations_per_hour": round(3600 * total_jobs / sync, 1),
                     "sync_idle_share": round(1 - total_time / (w * sync), 4),
                     "async_idle_share": round(1 - total_time / (w * asynchronous), 4),
                     "async_evaluations_per_hour": round(3600 * total_jobs / asynchronous, 1)})
    return rows


def run(out: Path, generations: int, cost: Cost, configs: list[str], seed: int) -> dict[str, Any]:
    space = load_space(SPACE)
    space = with_overrides(space, gp={"generations": generations, "seed": seed})
    fidelities = tuple(space.fidelity.windows)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="metricgp-distributed-"))
    with local_head(num_cpus=2) as address:
        for name in configs:
            backend, workers, dispatch = CONFIGS[name]
            config = RunConfig(space=space, evaluator="synthetic", evaluator_spec=cost.spec(fidelities),
                               backend=backend, workers=workers, dispatch=dispatch,
                               ray_address=address if backend == "ray" else None, name=name)
            print(f"{name}: {generations} generations ...", file=sys.stderr, flush=True)
            start(config, scratch / name)
            rows.append({"config": name, "backend": backend, "workers": workers, "dispatch": dispatch,
                         **summarize(scratch / name, workers)})
    driver = next((r["driver_seconds_per_generation"] for r in rows if r["config"] == "serial"), 0.0)
    predicted = model_rows(fidelities, space.gp.offspring, space.fidelity.eta, cost, driver=driver)
    on_gpu = model_rows(fidelities, space.gp.offspring, space.fidelity.eta, H100_8B_ESTIMATE, driver=driver)
    payload = {"space": str(SPACE.relative_to(ROOT)), "fidelities": fidelities, "offspring": space.gp.offspring,
               "eta": space.fidelity.eta, "generations": generations, "cost": dataclasses.asdict(cost),
               "cluster": "ray start --head --num-cpus 2 on 127.0.0.1, joined with --ray-address",
               "rows": rows, "driver_seconds_per_generation": driver, "model": predicted,
               "model_8b_h100": {"cost": dataclasses.asdict(H100_8B_ESTIMATE), "basis": H100_8B_BASIS, "rows": on_gpu},
               **provenance()}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", payload)
    (out / "bench.md").write_text(table(payload), encoding="utf-8")
    plot(payload, out / "idle.png")
    return payload


def table(payload: dict[str, Any]) -> str:
    serial = next((r for r in payload["rows"] if r["config"] == "serial"), None)
    lines = [f"# Metric search on a local Ray cluster ({payload['cluster']})", "",
             f"Made by: `{payload['command']}`", "",
             f"Space `{payload['space']}` (offspring {payload['offspring']}, fidelities {payload['fidelities']}, "
             f"eta {payload['eta']}), {payload['generations']} generations after the initial population; synthetic "
             f"evaluator sleeping {payload['cost']['per_candidate']} s per candidate + "
             f"{payload['cost']['per_window']} s per new window, x exp({payload['cost']['jitter']} z) per "
             "candidate.", "",
             "| config | workers | dispatch | evaluations/h | vs serial | windows run/h | worker idle share | "
             "best fitness |", "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        ratio = f"{r['evaluations_per_hour'] / serial['evaluations_per_hour']:.2f}x" if serial else "-"
        lines.append(f"| {r['config']} | {r['workers']} | {r['dispatch']} | {r['evaluations_per_hour']:.0f} | "
                     f"{ratio} | {r['windows_per_hour']:.0f} | {r['worker_idle_share']:.3f} | "
                     f"{r['best_fitness']:.5f} |")
    lines += ["", f"Throughput model (README.md), same costs, no stragglers, the serial run's driver time "
              f"({payload['driver_seconds_per_generation']} s per generation):", ""]
    lines += _model_table(payload["model"], payload["driver_seconds_per_generation"])
    est = payload["model_8b_h100"]
    lines += ["", f"The same model for Llama-3.1-8B on H100s ({est['basis']}): {est['cost']['per_candidate']} s per "
              f"candidate + {est['cost']['per_window']} s per window.", ""]
    lines += _model_table(est["rows"], payload["driver_seconds_per_generation"])
    return "\n".join(lines) + "\n"


def _model_table(rows: list[dict[str, Any]], driver: float) -> list[str]:
    out = ["| workers | sync evaluations/h | sync idle share | async evaluations/h | async idle share |",
           "|---|---|---|---|---|"]
    for m in rows:
        out.append(f"| {m['workers']} | {m['sync_evaluations_per_hour']:.0f} | {m['sync_idle_share']:.3f} | "
                   f"{m['async_evaluations_per_hour']:.0f} | {m['async_idle_share']:.3f} |")
    work = rows[0]["work_seconds_per_generation"]
    if driver > 0:
        out += ["", f"Async stops scaling where the driver's {driver} s per generation exceeds the work per worker "
                f"({work} s / N): N = {work / driver:.0f} workers; sync gains nothing past N = offspring."]
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in payload["rows"]:
        ax.plot(range(1, len(r["idle_share_per_generation"]) + 1), r["idle_share_per_generation"],
                marker="o", label=r["config"])
    ax.set_xlabel("generation")
    ax.set_ylabel("worker idle share")
    ax.set_ylim(0, 1)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--generations", type=int, default=12)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-candidate", type=float, default=Cost.per_candidate)
    p.add_argument("--per-window", type=float, default=Cost.per_window)
    p.add_argument("--jitter", type=float, default=Cost.jitter)
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        print(f"error: unknown config(s) {', '.join(sorted(unknown))} (choose from {', '.join(CONFIGS)})",
              file=sys.stderr)
        return 2
    payload = run(args.out, args.generations, Cost(args.per_candidate, args.per_window, args.jitter), configs,
                  args.seed)
    print(table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
