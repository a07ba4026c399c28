"""`python -m metricgp.structured.experiments saap`: what each piece of SAAP earns.

    python -m metricgp.structured.experiments saap --out results/structured     # make saap-ablation

At every keep level (`--keeps`, default 0.7) the dense model is pruned one-shot (no recovery) by

    estimators   the fused importance of all `--estimators`, and each estimator alone, all with the
                 stability allocation (`SAAPOptions(estimators=(k,))`: with one estimator the fusion is
                 F = I_k / (2 sigma_k^2), a positive multiple of that estimator's own importance, and the
                 stability signals S_m, A_m are scale-free, so the row is the estimator alone)
                 the fused importance with the earlier `consistency` fusion (sigma_k from the variance
                 across windows alone), to show what checking estimators against measured probes earns
    allocation   the fused importance with the stability, uniform and global allocations
    edge blocks  the stability allocation with and without `skip_edge_blocks`

Every one-shot row also records its measured prefill/decode speed-up against the dense model (same
process, `speed_report`). The SAAP model (fused importance, stability allocation) is then recovered
twice on the same `--recover-tokens`: group fine-tuning (`--group-finetune-groups` x rank 8) and plain LoRA with the
rank whose trainable-parameter count is closest (`recover.compare_with_lora`). Every row is
written to saap.json when it finishes, so a rerun does only the missing ones; saap.md (the tables,
the fusion's equations from `metricgp.structured.saap` and which rows win) and saap-sigma.png (the
learned sigma_k and weights 1 / (2 sigma_k^2)) are made from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from metricgp.errors import MetricGPError
from metricgp.experiments import rows as ex
from metricgp.plotting import pyplot, save_figure
from metricgp.provenance import git_sha, provenance
from metricgp.structured import saap
from metricgp.structured.evaluator import StructuredSpec, prune, speed_report
from metricgp.structured.methods import get_method
from metricgp.structured.recover import compare_with_lora, recover
from metricgp.structured.saap import SAAPOptions
from metricgp.structured.saap.estimators import DEFAULT_ESTIMATORS, ESTIMATORS, split_estimators

FUSED = "fused"
DEFAULT_FUSION = SAAPOptions().fusion
CONSISTENCY = "consistency"  # the earlier fusion (variance across windows only), kept as an ablation row
ABLATION_VERSION = 2  # 2: the fusion checks estimators against measured probes; rows carry speed ratios
SPEED_PROMPT, SPEED_REPEATS = 128, 3  # each one-shot row's prefill/decode speed-up against dense
GROUP_RANK = 8  # group fine-tuning's rank per group (recover's default); LoRA's rank is matched to it
RECOVERIES = ("group-lora", "lora")
# the evolved metric the ablation fuses with the four built-ins: the default search's best.json (a file, so
# its rows are labelled "evolved (<run>)"); give another with --estimators
EVOLVED_FILE = "results/smollm2-default-s0/best.json"
ESTIMATORS_DEFAULT = (*DEFAULT_ESTIMATORS, EVOLVED_FILE)


def add_saap_ablation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimators", default=",".join(ESTIMATORS_DEFAULT),
                   help=f"saap: the estimators fused (and ablated one by one): {', '.join(ESTIMATORS)}, metric "
                   "formulas or JSON files with a 'formula' key (default: the four and the evolved metric)")
    p.add_argument("--group-finetune-groups", type=int, default=4, help="saap: input-column groups per linear")
    p.add_argument("--no-progress", action="store_true",
                   help="saap: no progress bar over the rows nor of group fine-tuning (the per-window estimator "
                   "pass and the LoRA comparison keep theirs)")


@dataclass(frozen=True)
class Variant:
    """One one-shot row: the estimators fused, and how units are allocated to modules."""

    importance: str  # FUSED, or the one estimator used alone
    estimators: tuple[str, ...]
    allocation: str = "stability"
    skip_edge_blocks: bool = False
    fusion: str = DEFAULT_FUSION

    @property
    def name(self) -> str:
        fused = self.importance + (f"+{self.fusion}" if self.fusion != DEFAULT_FUSION else "")
        return f"{fused}|{self.allocation}" + ("+skip-edge" if self.skip_edge_blocks else "")

    def spec(self, keep: float) -> StructuredSpec:
        options = {"estimators": self.estimators} | ({"skip_edge_blocks": True} if self.skip_edge_blocks else {})
        options |= {"fusion": self.fusion} if self.fusion != DEFAULT_FUSION else {}
        fields = get_method("saap").spec | {"allocation": self.allocation}
        return StructuredSpec(keep=keep, **fields, options=SAAPOptions.from_dict(options).to_dict()).validate()

    def command(self, keep: float, args, recovery: tuple[str, ...] = ()) -> str:
        """The `metricgp.apply` command that makes this row's model (and, with `recovery`, recovers it)."""
        options = ("--estimators", shlex.quote(",".join(self.estimators)), "--allocation", self.allocation)
        options += ("--skip-edge-blocks",) if self.skip_edge_blocks else ()
        options += ("--fusion", self.fusion) if self.fusion != DEFAULT_FUSION else ()
        name = "saap-" + re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-")
        return ex.row_command("saap", keep, args, False, options + recovery, name)


def variants(estimators: tuple[str, ...]) -> list[Variant]:
    """The one-shot rows of one keep level, SAAP itself first."""
    alone = [Variant(e, (e,)) for e in estimators] if len(estimators) > 1 else []
    earlier = [Variant(FUSED, estimators, fusion=CONSISTENCY)] if len(estimators) > 1 else []
    return [Variant(FUSED, estimators), *earlier, *alone, Variant(FUSED, estimators, "uniform"),
            Variant(FUSED, estimators, "global"), Variant(FUSED, estimators, skip_edge_blocks=True)]


def _settings(args) -> dict:
    """What every row of one saap.json shares; a rerun with other settings must use another --out."""
    return {"version": ABLATION_VERSION, "model": args.model, "calib": args.calib, "n_calib": args.n_calib,
            "seqlen": args.seqlen, "calib_seed": args.calib_seed, "dataset": args.dataset,
            "eval_windows": args.eval_windows, "estimators": list(args.estimators),
            "recover_tokens": args.recover_tokens, "group_finetune_groups": args.group_finetune_groups,
            "group_rank": GROUP_RANK}


def validate(args) -> None:
    args.estimators = tuple(split_estimators(args.estimators))
    SAAPOptions.from_dict({"estimators": args.estimators})  # unknown names, missing files, repeats
    if args.recover_tokens < 0 or args.group_finetune_groups < 1 or args.eval_windows < 1:
        raise MetricGPError(f"--recover-tokens must be >= 0, --group-finetune-groups and --eval-windows >= 1; got "
                            f"{args.recover_tokens}, {args.group_finetune_groups} and {args.eval_windows}")
    path = args.out / "saap.json"
    before = ex.earlier(path).get("settings")
    if before is not None and before != _settings(args):
        differ = sorted(k for k in before.keys() | _settings(args).keys() if before.get(k) != _settings(args).get(k))
        raise MetricGPError(f"{path} holds rows made with other settings ({', '.join(differ)}); "
                            "give another --out or remove it")


def run_saap(args) -> None:
    """Every missing row, one-shot first, then the recoveries; then saap.md and saap-sigma.png."""

    validate(args)
    path = args.out / "saap.json"
    rows = ex.load_rows(path)
    setup = ex.pruning_setup(args)
    evals, dense = ex.evaluation_windows(setup, args)
    meta = {"what": "SAAP ablation: fused vs single estimators, stability vs uniform/global allocation, edge "
                    "blocks (one-shot); group fine-tuning vs LoRA (recovered); the learned sigma_k",
            "settings": _settings(args), "dense_ppl": dense,
            "invocations": ex.earlier(path).get("invocations", []) + [provenance()]}
    oneshot = [(k, v) for k in args.keeps for v in variants(args.estimators) if _key(k, v) not in rows]
    recovery = [(k, m) for k in args.keeps for m in RECOVERIES
                if args.recover_tokens and _key(k, variants(args.estimators)[0], m) not in rows]
    git = git_sha()
    bar = tqdm(total=len(oneshot) + len(recovery), desc="saap ablation", unit="row", disable=args.no_progress)
    for keep, v in oneshot:
        bar.set_postfix_str(f"{keep} {v.name}")
        t0 = time.perf_counter()
        rows[_key(keep, v)] = _oneshot_row(setup, v, keep, evals, args) | {
            "git": git, "seconds": round(time.perf_counter() - t0, 1)}
        _save(path, rows, meta, bar, _key(keep, v))
    train = ex.train_windows(setup, args) if recovery else None
    for keep, method in recovery:
        bar.set_postfix_str(f"{keep} {method}")
        t0 = time.perf_counter()
        v = variants(args.estimators)[0]
        rows[_key(keep, v, method)] = _recovered_row(setup, v, keep, method, train, evals, args) | {
            "git": git, "seconds": round(time.perf_counter() - t0, 1)}
        _save(path, rows, meta, bar, _key(keep, v, method))
    bar.close()
    _save(path, rows, meta)
    write_report(args.out, json.loads(path.read_text()))
    print(f"wrote {path}, {args.out / 'saap.md'} and {args.out / 'saap-sigma.png'}")


def _key(keep: float, v: Variant, recovery: str = "") -> str:
    return f"{keep}|{v.name}" + (f"|{recovery}" if recovery else "")


def _save(path: Path, rows: dict, meta: dict, bar=None, key: str = "") -> None:
    ex.save_rows(path, rows, meta | {"sigma": sigma_of(rows)})
    if bar is not None:
        ppl = rows[key].get("oneshot") or rows[key].get("recovered")
        bar.write(f"{key:<44} " + " ".join(f"{d} {_fmt(p)}" for d, p in ppl.items()))
        bar.update()


def _oneshot_row(setup, v: Variant, keep: float, evals: dict, args) -> dict:
    model, sizes = prune(setup, None, v.spec(keep))
    saap = sizes["saap"]
    setup.dense.restore()
    speed = speed_report(setup.model, model, prompt_len=SPEED_PROMPT, repeats=SPEED_REPEATS)
    return {"keep": keep, "importance": v.importance, "fusion_rule": v.fusion, "estimators": list(v.estimators),
            "allocation": v.allocation, "skip_edge_blocks": v.skip_edge_blocks, **ex.size_fields(sizes),
            "oneshot": ex.perplexities(model, evals), "fusion": saap["fusion"],
            "speed": {k: speed[k] for k in ("prefill_speedup", "decode_speedup", "flops_ratio", "param_ratio")},
            "module_keep": {m: s["keep"] for m, s in saap.get("modules", {}).items()},
            "command": v.command(keep, args)}


def _recovered_row(setup, v: Variant, keep: float, method: str, train, evals: dict, args) -> dict:
    """The SAAP model recovered by group fine-tuning, or by LoRA at its token and parameter budget."""
    model, sizes = prune(setup, None, v.spec(keep))
    budget = {"tokens": args.recover_tokens, "groups": args.group_finetune_groups, "seed": args.calib_seed}
    if method == "lora":
        model, report = compare_with_lora(model, train, rank=GROUP_RANK, **budget)
        rank = report["lora_rank"]
    else:
        report = recover(model, train, method="group-lora", rank=GROUP_RANK, progress=not args.no_progress,
                         **budget).to_dict()
        rank = GROUP_RANK
    recovery = ("--group-finetune-tokens", str(args.recover_tokens), "--group-finetune-groups",
                str(args.group_finetune_groups), "--compare-lora")
    return {"keep": keep, "recovery": method, "importance": v.importance, "allocation": v.allocation,
            **ex.size_fields(sizes), "rank": rank, "trainable_params": report["trainable_params"],
            "tokens": report["tokens"], "report": report, "recovered": ex.perplexities(model, evals),
            "command": v.command(keep, args, recovery)}


def sigma_of(rows: dict) -> dict | None:
    """The learned sigma_k, L_k and weight 1 / (2 sigma_k^2) of each estimator in the fused importance
    (they depend on the calibration, not on the keep level). Of equal records, the most complete:
    rows made later also record each estimator's Spearman against the probes."""
    fusions = [r["fusion"] for r in rows.values() if _is_saap(r) and "fusion" in r]
    return max(fusions, key=lambda f: sum(len(v) for v in f.values()), default=None)


def _is_saap(row: dict) -> bool:
    """A row of the fused importance with the default fusion (rows made before fusions were named had one)."""
    return row.get("importance") == FUSED and row.get("fusion_rule", DEFAULT_FUSION) == DEFAULT_FUSION


# ---------------------------------------------------------------- saap.md and saap-sigma.png


@dataclass(frozen=True)
class Part:
    title: str
    about: str
    select: Callable[[dict], bool]
    label: Callable[[dict], str]


PARTS = (
    Part("Estimators", "the fused importance against each estimator alone, all with the stability allocation",
         lambda r: r["allocation"] == "stability" and not r["skip_edge_blocks"],
         lambda r: label(r["importance"], r.get("fusion_rule", DEFAULT_FUSION))),
    Part("Allocation", "the fused importance with the stability, uniform and global allocations",
         lambda r: _is_saap(r) and not r["skip_edge_blocks"], lambda r: r["allocation"]),
    Part("Edge blocks", "the stability allocation with and without skip_edge_blocks (first and last blocks whole)",
         lambda r: _is_saap(r) and r["allocation"] == "stability",
         lambda r: "skip first and last blocks" if r["skip_edge_blocks"] else "every block prunable"),
)


def label(estimator: str, fusion: str = DEFAULT_FUSION) -> str:
    if estimator == FUSED:
        return "fused (SAAP)" if fusion == DEFAULT_FUSION else f"fused, {fusion} fusion (ablation)"
    return f"evolved ({Path(estimator).parent.name})" if estimator.endswith(".json") else estimator


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def geomean(ppl: dict) -> float | None:
    values = list(ppl.values())
    if not values or any(v is None or not 0 < v < math.inf for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _scored(rows: list[tuple[str, dict]], datasets: list[str]) -> list[tuple[str, dict]]:
    """(label, perplexity per dataset and their geometric mean) of each row."""
    return [(name, {**{d: ppl.get(d) for d in datasets}, "geomean": geomean(ppl)}) for name, ppl in rows]


def _best(scored: list[tuple[str, dict]], column: str) -> tuple[str, float] | None:
    finite = [(p[column], name) for name, p in scored if p[column] is not None]
    return (min(finite)[1], min(finite)[0]) if finite else None


def _ppl_table(head: list[str], cells: list[list[str]], scored: list[tuple[str, dict]],
               datasets: list[str]) -> list[str]:
    """A markdown table: the given cells, then the perplexities, the lowest of each column in bold."""
    columns = [*datasets, "geomean"]
    best = {c: _best(scored, c) for c in columns}
    lines = ["| " + " | ".join([*head, *datasets, "geometric mean"]) + " |", "|" + "---|" * (len(head) + len(columns))]
    for row, (name, p) in zip(cells, scored, strict=True):
        ppl = [f"**{_fmt(p[c])}**" if best[c] and best[c][0] == name else _fmt(p[c]) for c in columns]
        lines.append("| " + " | ".join([*row, *ppl]) + " |")
    return lines


def _winners(scored: list[tuple[str, dict]], datasets: list[str]) -> str:
    found = [(c, _best(scored, c)) for c in [*datasets, "geomean"]]
    return "Lowest perplexity: " + "; ".join(
        f"{'geometric mean' if c == 'geomean' else c} `{b[0]}` ({b[1]:.2f})" for c, b in found if b) + "."


def _rank(scored: list[tuple[str, dict]], name: str) -> str:
    """Where `name` stands by the geometric mean, e.g. '1st of 6'."""
    order = sorted((p["geomean"], n) for n, p in scored if p["geomean"] is not None)
    place = [n for _, n in order].index(name) + 1 if name in [n for _, n in order] else None
    return f"{place} of {len(order)}" if place else "not ranked (no finite perplexity)"


def _part_section(part: Part, rows: list[dict], datasets: list[str]) -> list[str]:
    mine = [r for r in rows if "oneshot" in r and part.select(r)]
    if not mine:
        return []
    scored = _scored([(part.label(r), r["oneshot"]) for r in mine], datasets)
    cells = [[part.label(r), f"{r['achieved_keep']:.4f}", f"{r['params'] / 1e6:.2f}M", *_speed_cells(r)]
             for r in mine]
    head = ["", "kept", "params", "prefill x", "decode x", "FLOPs ratio"]
    lines = [f"### {part.title}: {part.about}", "",
             *_ppl_table(head, cells, scored, datasets), "", _winners(scored, datasets)]
    if part.title == "Estimators":
        lines[-1] += f" The fused importance ranks {_rank(scored, label(FUSED))} by the geometric mean."
    return [*lines, ""]


def _speed_cells(row: dict) -> list[str]:
    """Measured prefill and decode speed-up against dense in the same process, and the FLOPs ratio."""
    s = row.get("speed")
    if not s:
        return ["-", "-", "-"]
    return [f"{s['prefill_speedup']:.2f}", f"{s['decode_speedup']:.2f}", f"{s['flops_ratio']:.2f}"]


def _recovery_section(rows: list[dict], datasets: list[str], keep: float, groups: int) -> list[str]:
    base = next((r for r in rows if "oneshot" in r and _is_saap(r) and r["allocation"] == "stability"
                 and not r["skip_edge_blocks"]), None)
    recovered = {r["recovery"]: r for r in rows if "recovery" in r}
    if not recovered:
        return []
    names = {"group-lora": "group fine-tuning", "lora": "LoRA"}
    entries = ([("one-shot (no recovery)", ["-", "-", "-"], base["oneshot"])] if base else []) + [
        (names[m], [f"{r['rank']}" + (f" per group, {groups} groups" if m == "group-lora" else ""),
                    f"{r['trainable_params']:,}", f"{r['tokens']:,}"], r["recovered"])
        for m, r in sorted(recovered.items())]
    scored = _scored([(name, ppl) for name, _, ppl in entries], datasets)
    lines = [f"### Recovery of the SAAP model at {keep:.0%} kept: group fine-tuning vs LoRA", "",
             *_ppl_table(["", "rank", "trainable params", "tokens"], [[n, *c] for n, c, _ in entries], scored,
                         datasets), "", _winners(scored, datasets)]
    if set(recovered) == set(RECOVERIES):
        g, lo = (dict(scored)[names[m]] for m in RECOVERIES)
        lower = [d for d in datasets if g[d] is not None and lo[d] is not None and g[d] < lo[d]]
        lines[-1] += (f" Group fine-tuning is lower than LoRA on {len(lower)} of {len(datasets)} datasets"
                      + (f" ({', '.join(lower)})" if lower else "") + ".")
    return [*lines, ""]


def _sigma_section(sigma: dict | None) -> list[str]:
    if not sigma:
        return []
    top = max(sigma, key=lambda k: sigma[k]["weight"])
    lines = ["## The learned noise scales", "",
             "| estimator | sigma_k | L_k (rank error vs measured probes) | Spearman vs probes | variance across "
             "windows | weight 1/(2 sigma_k^2) | share of the weights |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {label(k)} | {s['sigma']:.4g} | {s.get('loss', s['inconsistency']):.4g} | "
              + (f"{s['probe_spearman']:+.3f}" if s.get("probe_spearman") is not None else "-")
              + f" | {s['inconsistency']:.4g} | {s['weight']:.4g} | {100 * s['share']:.3g}% |"
              for k, s in sigma.items()]
    return [*lines, "", f"The largest weight goes to `{label(top)}` ({100 * sigma[top]['share']:.3g}% of the total); "
            "sigma_k^2 equals L_k (closed form; an L_k of 0 is floored at the smallest positive one). A random "
            "ranking has L_k of about 1/6. Plot: saap-sigma.png.", ""]


def _equations() -> list[str]:
    """The notation and the equation blocks of `metricgp.structured.saap`'s docstring, verbatim."""
    paragraphs = [p for p in saap.__doc__.split("\n\n") if p.strip()]
    blocks = [textwrap.dedent(p) for p in paragraphs if all(line.startswith("    ") for line in p.splitlines())]
    why = [" ".join(p.split()) for p in paragraphs if p.startswith("Why")]
    return [" ".join(paragraphs[1].split()), "", "Fusion:", "", "```", blocks[0], "```", "", *why, "",
            "Stability allocation:", "", "```", blocks[1], "```", ""]


def write_report(out: Path, table: dict) -> None:
    """saap.md and saap-sigma.png from saap.json."""
    s, rows, datasets = table["settings"], list(table["rows"].values()), list(table["dense_ppl"])
    runs = table.get("invocations", [])
    keeps = ", ".join(f"{k:.0%}" for k in sorted({r["keep"] for r in rows}, reverse=True))
    lines = [
        "# SAAP ablation: what each piece earns", "",
        f"Model `{s['model']}`, pruned one-shot to {keeps} of the "
        f"decoder parameters with SAAP (`metricgp.structured.saap`); estimators fused: "
        + ", ".join(f"`{e}`" for e in s["estimators"]) + ". "
        f"Per-window estimator scores on {s['n_calib']} {s['calib']} calibration windows of {s['seqlen']} tokens "
        f"(seed {s['calib_seed']}). Test perplexity on the first {s['eval_windows']} windows of {s['seqlen']} "
        f"tokens of each test split. Recovery: {s['recover_tokens']:,} tokens of {s['calib']} (train split, seed "
        f"{s['calib_seed'] + 1}); group fine-tuning with {s['group_finetune_groups']} groups x rank "
        f"{s['group_rank']} against plain LoRA with the rank of the closest trainable-parameter count, same "
        "alpha / rank, lr and seed. Bold: the lowest perplexity of a column.", "",
        "Dense: " + ", ".join(f"{d} {_fmt(v)}" for d, v in table["dense_ppl"].items()), "",
        "Made by: " + "; then ".join(f"`{r['command']}` (git {r.get('git') or 'unknown'})" for r in runs)
        + ". Each row's JSON entry has the `python -m metricgp.apply` command that reproduces it.", "",
        "## The fusion, as implemented (`metricgp/structured/saap.py`)", "", *_equations(),
    ]
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["keep"] == keep]
        lines += [f"## {keep:.0%} kept", ""]
        for part in PARTS:
            lines += _part_section(part, mine, datasets)
        lines += _recovery_section(mine, datasets, keep, s["group_finetune_groups"])
    lines += _sigma_section(table.get("sigma"))
    (out / "saap.md").write_text("\n".join(lines).rstrip() + "\n")
    if table.get("sigma"):
        plot_sigma(out / "saap-sigma.png", table["sigma"])


def plot_sigma(path: Path, sigma: dict) -> None:
    plt = pyplot()
    names = [label(k) for k in sigma]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, field, colour, title in ((axes[0], "sigma", "tab:blue", "learned sigma_k"),
                                     (axes[1], "weight", "tab:orange", "fusion weight 1 / (2 sigma_k^2)")):
        bars = ax.bar(names, [s[field] for s in sigma.values()], color=colour)
        for bar, s in zip(bars, sigma.values(), strict=True):
            if s.get("inconsistency") == 0:  # window-independent (magnitude): steady, not necessarily right
                bar.set_hatch("//")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3, which="both")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    if any(s.get("inconsistency") == 0 for s in sigma.values()):
        fig.text(0.01, 0.01, "hatched: the same on every window (no variance); its weight comes from its rank error",
                 fontsize=7)
    save_figure(fig, path)
