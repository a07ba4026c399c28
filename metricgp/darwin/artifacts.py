"""What a level-search run writes besides the checkpoint (log.jsonl is shared with the metric search).

- best.json: the winner's levels, keep fraction and fitness (structured: also the keep map that
  `apply --structured --keep-map` reads);
- levels.txt: one line per gene (module or linear), its level and what it keeps;
- fitness.png: KL (or the chosen fitness) over generations; levels.png: the winner's levels per block;
- README.md: a short summary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metricgp.darwin.levels import Genome, LevelSpace
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import write_json_atomic
from metricgp.zeroshot import table_lines


def best_payload(space: LevelSpace, genome: Genome, fitness: float, gen: int, database) -> dict[str, Any]:
    out = {"genome": list(genome), "genes": [g.name for g in space.genes], "fitness": fitness,
           "kept": space.kept_fraction(genome), "removed_params": space.removed(genome), "generation": gen}
    if hasattr(database, "keep_map"):
        out["keep_map"] = database.keep_map(genome)
    else:
        out["sparsity_per_layer"] = {n: database.sparsity_of(i, lv) for i, (n, lv) in enumerate(zip(
            database.names, genome, strict=True))}
    return out


def levels_text(space: LevelSpace, genome: Genome) -> str:
    lines = ["# gene  kind  level/max  removed-params"]
    for g, level in zip(space.genes, genome, strict=True):
        lines.append(f"{g.name}  {g.kind}  {level}/{g.max_level}  {level * g.step}")
    lines.append(f"# kept fraction {space.kept_fraction(genome):.6f} of {space.total} parameters")
    return "\n".join(lines) + "\n"


def write_best(run_dir: Path, space: LevelSpace, genome: Genome, fitness: float, gen: int, database) -> None:
    write_json_atomic(Path(run_dir) / "best.json", best_payload(space, genome, fitness, gen, database))
    (Path(run_dir) / "levels.txt").write_text(levels_text(space, genome), encoding="utf-8")


def write_plots(run_dir: Path, records: Sequence[dict[str, Any]], space: LevelSpace, genome: Genome,
                fitness_name: str) -> None:
    plt = pyplot()
    gens = [r["gen"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(gens, [r["fitness"] for r in records], marker=".", label="parent (last stage)")
    for key, label in (("first_stage_best", "best offspring, first stage"),
                       ("first_stage_median", "median offspring, first stage")):
        ys = [r.get(key) for r in records]
        ax.plot(gens, [math.nan if y is None else y for y in ys], alpha=0.6, label=label)
    ax.set(xlabel="generation", ylabel=f"{fitness_name} (lower is better)", title="Fitness over generations")
    ax.legend()
    save_figure(fig, Path(run_dir) / "fitness.png")

    kinds = space.kinds()
    fig, axes = plt.subplots(len(kinds), 1, figsize=(7, 1.8 + 1.4 * len(kinds)), squeeze=False)
    for ax, (kind, idx) in zip(axes[:, 0], kinds.items(), strict=True):
        ax.bar(range(len(idx)), [genome[i] for i in idx])
        ax.axhline(max(g.max_level for g in space.genes if g.kind == kind), color="grey", lw=0.8, ls="--")
        ax.set(ylabel="level", title=f"{kind}: winner's levels by block (dashed: top level)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[:, 0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("block")
    save_figure(fig, Path(run_dir) / "levels.png")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return ""


def final_lines(final: dict[str, Any]) -> list[str]:
    """The final model's test perplexity (one row per model, one column per dataset), zero-shot accuracy
    (with --zero-shot), size and speed."""
    ppl = final.get("perplexity", {})
    datasets = sorted({d for row in ppl.values() for d in row})
    lines = []
    if datasets:
        lines += ["| test perplexity | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{row[d]:.2f}" if d in row else "" for d in datasets) + " |"
                  for name, row in ppl.items() if row]
        lines.append("")
    if final.get("zero_shot"):
        lines += [*table_lines(final["zero_shot"]), ""]
    size = final.get("size")
    if size:
        lines += [f"Decoder parameters kept {size['achieved_keep']:.4f} (target {size['target_keep']}); parameters "
                  f"{size['params']['dense']:,} -> {size['params']['pruned']:,}.", ""]
    speed = final.get("speed")
    if speed:
        lines += [f"Speed vs dense (measured in the same run): prefill {speed['prefill_speedup']:.2f}x, decode "
                  f"{speed['decode_speedup']:.2f}x; FLOPs ratio {speed['flops_ratio']:.2f}x, parameter ratio "
                  f"{speed['param_ratio']:.2f}x.", ""]
    return lines


def write_summary(run_dir: Path, config: dict[str, Any], records: Sequence[dict[str, Any]], stopped: str,
                  spearman_all: float | None, final: dict[str, Any] | None) -> None:
    last = records[-1] if records else {}
    target = f"sparsity {config['sparsity']}" if config["unstructured"] else f"keep {config['keep']}"
    lines = [f"# Level search `{config['name']}`", "",
             f"{'EvoPress unstructured' if config['unstructured'] else 'DarwinLM structured'}, {target}, "
             f"metric `{config['metric']}` ({config['metric_source']}), prior {'on' if config['prior'] else 'off'}, "
             f"{config['offspring']} offspring, stages {config['stages']}.", "",
             f"Stopped: {stopped}. Generations: {last.get('gen', 0)}; fitness ({config['fitness']}) "
             f"{records[0]['fitness'] if records else float('nan'):.6g} -> {last.get('fitness', float('nan')):.6g}; "
             f"kept {last.get('kept', float('nan')):.6f}. Spearman (predicted loss vs first-stage fitness, "
             f"all generations): {'n/a' if spearman_all is None else f'{spearman_all:.3f}'}.", ""]
    config_file = Path(run_dir) / "config.json"
    if config_file.is_file():

        disk = json.loads(config_file.read_text(encoding="utf-8")).get("database", {})
        if disk:
            lines += [f"Level database: {_size(disk['stored_bytes'])} on disk (orders and steps, no weights) "
                      f"against {_size(disk['full_copies_bytes'])} for full-size copies of every level "
                      f"({disk['ratio']:.0f}x)."
                      + (f" The `{disk['update']}` weight update adds {_size(disk['update_bytes'])} of "
                         "output-projection Hessians; each level's weights are solved when a genome needs them."
                         if disk.get("update_bytes") else ""), ""]
    if final:
        lines += final_lines(final)
    lines += ["Files: log.jsonl, best.json, levels.txt, fitness.png, levels.png, database.json, config.json"
              + (", report.json" if final else "") + (", model/" if (Path(run_dir) / "model").is_dir() else "")
              + ".", ""]
    (Path(run_dir) / "README.md").write_text("\n".join(lines), encoding="utf-8")
