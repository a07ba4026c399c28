"""`python -m metricgp.structured.experiments`: the tables in results/structured/ (and results/structured-seeds/).

    python -m metricgp.structured.experiments defaults --out results/structured   # choose reduction/normalisation
    python -m metricgp.structured.experiments table --out results/structured      # make structured
    python -m metricgp.structured.experiments saap --out results/structured       # make saap-ablation
    python -m metricgp.structured.experiments seeds --calib-seeds 0,1,2 ...       # the spread over seeds (seeds.py)

The model and its statistics load once; every row is written when it finishes (a rerun resumes)
and carries the `python -m metricgp.apply --structured ...` command that reproduces it. `table` is
in table.py, `saap` in saap.py, `seeds` in seeds.py; their shared helpers in rows.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import metricgp
from metricgp.cli.options import add_model_data_options
from metricgp.errors import MetricGPError, cli_entry
from metricgp.experiments.rows import (
    load_rows,
    metric_tree,
    pruning_setup,
    save_rows,
    this_command,
)
from metricgp.experiments.saap import add_saap_ablation_options, run_saap
from metricgp.experiments.seeds import run_seeds
from metricgp.experiments.table import run_table
from metricgp.measure import perplexity
from metricgp.structured.evaluator import StructuredSpec, per_layer_sizes, prune, speed_report
from metricgp.structured.methods import METHODS, get_method
from metricgp.structured.saving import save_pruned
from metricgp.structured.speed import decode_breakdown

# the key level first, so an interrupted run has it
DEFAULT_KEEPS = {"table": "0.7,0.5,0.8,0.9", "saap": "0.7", "seeds": "0.7"}


def run_defaults(args) -> None:
    """Reduction x normalisation x allocation at one keep level, scored on validation windows."""
    path = args.out / "defaults.json"
    rows = load_rows(path)
    setup = pruning_setup(args)
    valid = setup.fitness_windows(args.valid_windows)
    tree = metric_tree(args.metric)
    combos = [(r, n, "global") for r in ("sum", "mean", "l2", "max")
              for n in ("none", "per-param", "module-mean", "module-zscore")]
    combos += [(r, "per-param", "uniform") for r in ("sum", "mean", "l2", "max")]
    meta = {"what": "validation perplexity of structured pruning by reduction x normalisation x allocation",
            "metric": args.metric, "keep": args.keep, "valid_windows": len(valid), "seqlen": args.seqlen}
    for reduction, norm, alloc in combos:
        key = f"{reduction}|{norm}|{alloc}"
        if key in rows:
            continue
        spec = StructuredSpec(keep=args.keep, reduction=reduction, normalisation=norm, allocation=alloc)
        model, sizes = prune(setup, tree, spec)
        rows[key] = {"reduction": reduction, "normalisation": norm, "allocation": alloc,
                     "valid_ppl": perplexity(model, valid), "achieved_keep": sizes["achieved_keep"]}
        print(f"{key:<32} {rows[key]['valid_ppl']:10.3f}", flush=True)
        save_rows(path, rows, meta | {"command": this_command()})
    _write_defaults_md(args.out, rows, meta)


def _write_defaults_md(out: Path, rows: dict, meta: dict) -> None:
    best = min(rows.values(), key=lambda r: r["valid_ppl"])
    lines = [f"# Structured defaults: {meta['metric']} at {meta['keep']:.0%} kept decoder parameters",
             "", f"Validation (WikiText-2 validation, {meta['valid_windows']} x {meta['seqlen']} tokens) perplexity.",
             f"Command: `{this_command()}`", "", "| reduction | normalisation | allocation | valid ppl | kept |",
             "|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: r["valid_ppl"]):
        lines.append(f"| {r['reduction']} | {r['normalisation']} | {r['allocation']} | {r['valid_ppl']:.2f} | "
                     f"{r['achieved_keep']:.4f} |")
    lines += ["", f"Best: reduction `{best['reduction']}`, normalisation `{best['normalisation']}`, "
              f"allocation `{best['allocation']}`."]
    (out / "defaults.md").write_text("\n".join(lines) + "\n")


def run_speed(args) -> None:
    """The 'done' check of a structured model: physically smaller, measured speed (prefill and
    decode, dense and pruned interleaved in the same run, next to the FLOPs and parameter ratios),
    and identical logits after saving and reloading through `load_pruned` and, in a fresh
    process, through plain `AutoModelForCausalLM.from_pretrained` after `import metricgp`."""


    setup = pruning_setup(args)
    m = get_method(args.method)
    model, sizes = prune(setup, metric_tree(m.metric), StructuredSpec(keep=args.keep, **m.spec))
    setup.dense.restore()
    speeds = [speed_report(setup.model, model, prompt_len=p, repeats=args.repeats) for p in args.prompt_lens]
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(model, tmp, tokenizer=setup.tokenizer, per_layer=per_layer_sizes(model))
        reload = _reload_check(model, Path(tmp), setup.calib[:1, :64])
    result = {"method": args.method, "keep": args.keep, "achieved_keep": sizes["achieved_keep"],
              "params": sizes["params"], "bytes": sizes["bytes"], "decoder_params": sizes["decoder_params"],
              "speed": speeds, "reload": reload, "command": this_command()}
    save_rows(args.out / "speed.json", {}, result)
    for s in speeds:
        print(f"{args.method} at {args.keep:.0%} kept, prompt {s['dense']['prompt_len']}: prefill "
              f"{s['prefill_speedup']:.2f}x, decode {s['decode_speedup']:.2f}x; FLOPs ratio {s['flops_ratio']:.2f}x, "
              f"parameter ratio {s['param_ratio']:.2f}x")
    print(f"reload: {reload}")


def run_profile(args) -> None:
    """Why decode gains less than the FLOPs ratio: the op-level time of one cached decode step,
    dense and pruned (`speed.decode_breakdown`); written to decode-profile.json."""


    setup = pruning_setup(args)
    m = get_method(args.method)
    model, sizes = prune(setup, metric_tree(m.metric), StructuredSpec(keep=args.keep, **m.spec))
    setup.dense.restore()
    result = {"method": args.method, "keep": args.keep, "achieved_keep": sizes["achieved_keep"],
              "params": sizes["params"], "threads": torch.get_num_threads(),
              "profiles": [decode_breakdown(setup.model, model, repeats=args.repeats, prompt_len=p)
                           for p in args.prompt_lens],
              "command": this_command()}
    save_rows(args.out / "decode-profile.json", {}, result)
    for b in result["profiles"]:
        print(f"prompt {b['dense']['prompt_len']}: matmul share dense {b['dense']['matmul_share']:.1%}, pruned "
              f"{b['pruned']['matmul_share']:.1%}; matmul speed-up {b['matmul_speedup']:.2f}x, other ops "
              f"{b['dense']['other_ms_per_step']:.1f} -> {b['pruned']['other_ms_per_step']:.1f} ms/step; "
              f"profiled decode speed-up {b['profiled_speedup']:.2f}x (Amdahl bound {b['amdahl_bound']:.2f}x)")


def _reload_check(model, path: Path, ids) -> dict:
    """Max |logit difference| after reloading, in this process and in a fresh one."""
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        mine = metricgp.load_pruned(path)(input_ids=ids).logits
    torch.save({"ids": ids, "logits": expected}, path / "expected.pt")
    script = (f"import metricgp, torch, transformers; e = torch.load({str(path / 'expected.pt')!r}, "
              f"weights_only=True); m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, "
              "dtype=torch.float32).eval(); print(float((m(input_ids=e['ids']).logits - e['logits']).abs().max()))")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return {"load_pruned_max_abs_diff": float((mine - expected).abs().max()),
            "auto_from_pretrained_fresh_process_max_abs_diff": float(fresh.stdout.strip().splitlines()[-1])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metricgp.structured.experiments")
    p.add_argument("what", choices=tuple(SUBCOMMANDS))
    p.add_argument("--out", type=Path, default=Path("results/structured"))
    add_model_data_options(p)
    p.add_argument("--metric", default="wanda", help="defaults: the metric whose structures are scored")
    p.add_argument("--keep", type=float, default=0.7, help="defaults: the keep level")
    p.add_argument("--valid-windows", type=int, default=16, help="defaults: validation windows")
    p.add_argument("--keeps", default=None,
                   help=f"table, saap: keep levels (default {DEFAULT_KEEPS['table']}, saap {DEFAULT_KEEPS['saap']})")
    p.add_argument("--methods", default=",".join(METHODS), help="table: methods")
    p.add_argument("--dataset", default="wikitext2,c4,ptb", help="table, saap: test data")
    p.add_argument("--eval-windows", type=int, default=8, help="table, saap: test windows per dataset")
    p.add_argument("--recover-tokens", type=int, default=8192, help="table, saap: recovery budget (0: none)")
    p.add_argument("--recover-keeps", default="0.7,0.5", help="table: keep levels that also get recovery")
    p.add_argument("--speed", action="store_true", help="table: measure prefill/decode speed ratios")
    p.add_argument("--method", default="wanda", help="speed, profile: the method whose pruned model is timed")
    p.add_argument("--prompt-lens", default="128,512", help="speed, profile: prompt lengths")
    p.add_argument("--repeats", type=int, default=5, help="speed: timed repeats (medians); profile: dense and pruned "
                   "profiled alternately this many times (medians)")
    p.add_argument("--calib-seeds", default="0,1,2", help="seeds: calibration seeds, one table each")
    p.add_argument("--pairs", default=None, help="seeds: A:B,... methods compared per seed (default X-refit:X)")
    p.add_argument("--reuse", type=Path, default=None, help="seeds: a table.json made with --reuse-seed whose "
                   "rows fill that seed's table")
    p.add_argument("--reuse-seed", type=int, default=0, help="seeds: the calibration seed of --reuse (default 0)")
    add_saap_ablation_options(p)
    return p


SUBCOMMANDS = {"defaults": run_defaults, "table": run_table, "speed": run_speed, "profile": run_profile,
               "saap": run_saap, "seeds": run_seeds}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.keeps = _numbers(args.keeps or DEFAULT_KEEPS.get(args.what, DEFAULT_KEEPS["table"]), float, "--keeps")
    args.prompt_lens = _numbers(args.prompt_lens, int, "--prompt-lens")
    args.recover_keeps = _numbers(args.recover_keeps, float, "--recover-keeps")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        get_method(m)
    if not args.keeps or any(not 0 < k <= 1 for k in args.keeps):
        raise MetricGPError(f"--keeps must be in (0, 1], got {args.keeps}")
    SUBCOMMANDS[args.what](args)
    return 0


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise MetricGPError(f"{flag} must be comma-separated numbers, got '{text}'") from None


if __name__ == "__main__":
    sys.exit(main())
