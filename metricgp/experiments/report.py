"""results/structured/table.md and table.png from the JSON table the experiments write."""

from __future__ import annotations

import math
from pathlib import Path

from metricgp.plotting import pyplot, save_figure


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def write_table(out: Path, table: dict) -> None:
    rows = sorted(table["rows"].values(), key=lambda r: (-r["keep"], r["method"]))
    datasets = list(table["dense_ppl"])
    head = ["method", "keep", "kept", "params"] + [f"{d} one-shot" for d in datasets]
    head += [f"{d} recovered" for d in datasets]
    lines = [
        "# Structured pruning of SmolLM2-135M-Instruct",
        "",
        f"Test perplexity on the first {table['eval_windows']} windows of {table['seqlen']} tokens of each test split; "
        f"recovery (at {', '.join(f'{k:.0%}' for k in table.get('recover_keeps', []))} kept): LoRA on "
        f"{table['recover_tokens']:,} C4 calibration tokens (train split). "
        "Measured speed against dense is in speed.json (`make bench-structured`, on a quiet machine).",
        "",
        "Dense: " + ", ".join(f"{d} {_fmt(v)}" for d, v in table["dense_ppl"].items()),
        "",
        "Made by: " + "; then ".join(f"`{c}`" for c in table.get("commands", [table.get("command")]))
        + ". Each row's JSON entry has the `apply` command that reproduces it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["method"], f"{r['keep']:.0%}", f"{r['achieved_keep']:.4f}", f"{r['params'] / 1e6:.1f}M"]
        cells += [_fmt(r["oneshot"].get(d)) for d in datasets]
        cells += [_fmt(r.get("recovered", {}).get(d)) for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Methods:", ""] + [f"- `{m}`: {about}" for m, about in table.get("methods", {}).items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(out / "table.png", rows, datasets[0], table["dense_ppl"][datasets[0]])


def _plot(path: Path, rows: list[dict], data: str, dense: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = sorted({r["method"] for r in rows})
    colours = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["achieved_keep"])
        x = [r["achieved_keep"] * 100 for r in mine]
        ax.plot(x, [r["oneshot"][data] for r in mine], "--o", color=colours(i), alpha=0.6, label=f"{m} one-shot")
        rec = [r for r in mine if "recovered" in r]
        if rec:
            ax.plot([r["achieved_keep"] * 100 for r in rec], [r["recovered"][data] for r in rec], "-s",
                    color=colours(i), label=f"{m} recovered")
    ax.axhline(dense, color="black", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("decoder parameters kept (%)")
    ax.set_ylabel(f"{data} test perplexity (log)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)
