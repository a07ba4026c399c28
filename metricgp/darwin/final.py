"""The winner as a model: physically shrunk (structured) or masked (unstructured), optionally recovered,
saved, reloaded and evaluated on test perplexity, next to the dense model and the baselines.

Structured: `StructuredPruner.build` gives the smaller copy, `recover` fine-tunes it on calibration
windows (--recover-tokens), `save_pruned` writes it to `out/model` and `metricgp.load_pruned` reads
it back; the reported perplexity is the reloaded model's. Unstructured: the winner is masked on the
dense model; uniform sparsity and OWL's allocation are scored alongside (KL on the fitness
windows, test perplexity), as EvoPress compares.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from metricgp import load_pruned
from metricgp.darwin.config import DarwinConfig, Prepared
from metricgp.darwin.fitness import structured_masks
from metricgp.darwin.levels import Genome
from metricgp.darwin.owl import owl_layer_sparsities
from metricgp.data import parse_report_data
from metricgp.evaluate import cached_dense_perplexity
from metricgp.measure import perplexity
from metricgp.prune.engine import prune_sequential
from metricgp.prune.patterns import Unstructured
from metricgp.recover import build_teacher, get_loss, training_windows
from metricgp.structured.evaluator import per_layer_sizes, size_report, speed_report
from metricgp.structured.recover import recover
from metricgp.structured.saving import save_pruned
from metricgp.zeroshot import ZeroShot, zero_shot_report

MODEL_DIR = "model"


def _test_windows(config: DarwinConfig, setup) -> dict[str, Any]:
    return {d: setup.report_windows(d, config.eval_windows or None) for d in parse_report_data(config.dataset)}


def _dense_ppl(config: DarwinConfig, setup, evals: dict) -> dict[str, float]:
    return {d: cached_dense_perplexity(setup, d, w) for d, w in evals.items()} if config.dense_eval else {}


def _dense_accuracy(config: DarwinConfig, setup, zero_shot: ZeroShot | None) -> dict[str, dict]:
    """The dense model's zero-shot accuracy (on the session's model, dense at the time), by label."""
    if zero_shot is None or not config.dense_eval:
        return {}
    return {"dense": zero_shot.evaluate(setup.model, setup.tokenizer)}


def structured_model(config: DarwinConfig, prep: Prepared, genome: Genome, out: Path,
                     zero_shot: ZeroShot | None = None) -> dict[str, Any]:
    """With `zero_shot`: the dense, pruned and (with recovery) recovered model's accuracy too."""
    setup, t0 = prep.setup, time.perf_counter()
    setup.dense.restore()
    accuracy = _dense_accuracy(config, setup, zero_shot)
    train, teacher = _recovery_data(config, setup)  # from the dense model, before the winner is built
    model = structured_masks(setup, prep.database, config.update).build(genome)
    report: dict[str, Any] = {"size": size_report(setup.model, model, config.keep)}
    evals = _test_windows(config, setup)
    report["perplexity"] = {"dense": _dense_ppl(config, setup, evals)}
    report["perplexity"]["pruned"] = {d: perplexity(model, w) for d, w in evals.items()}
    if zero_shot is not None:
        accuracy["pruned"] = zero_shot.evaluate(model, setup.tokenizer)
    if config.recover_tokens:
        rec = recover(model, train, method=config.recover_method, tokens=config.recover_tokens, lr=config.recover_lr,
                      seed=config.seed, progress=False, loss=config.recover_loss, teacher=teacher,
                      schedule=config.recover_schedule, warmup=config.recover_warmup,
                      checkpointing=config.recover_checkpointing)
        report["recovery"] = rec.to_dict()
        report["perplexity"]["recovered"] = {d: perplexity(model, w) for d, w in evals.items()}
        if zero_shot is not None:
            accuracy["recovered"] = zero_shot.evaluate(model, setup.tokenizer)
    if zero_shot is not None:
        report["zero_shot"] = zero_shot_report(zero_shot, accuracy)
    report["per_layer"] = {str(k): v for k, v in per_layer_sizes(model).items()}
    if config.save_model:
        save_pruned(model, out / MODEL_DIR, tokenizer=setup.tokenizer, per_layer=per_layer_sizes(model))
        reloaded = load_pruned(out / MODEL_DIR)
        report["reloaded"] = {
            "path": MODEL_DIR, "params": sum(p.numel() for p in reloaded.parameters()),
            "perplexity": {d: perplexity(reloaded, w) for d, w in evals.items()}}
    report["evaluation"] = {d: {"windows": len(w), "tokens": int(w.numel())} for d, w in evals.items()}
    if config.speed:
        report["speed"] = speed_report(setup.model, model)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _recovery_data(config: DarwinConfig, setup):
    """The final model's recovery windows (calibration seed + 1) and, for a distillation loss, the dense
    model's top-k on them; (None, None) without recovery."""
    if not config.recover_tokens:
        return None, None
    train = training_windows(config.fitness_data, setup.tokenizer, setup.spec.seqlen, config.recover_tokens,
                             setup.spec.seed + 1)
    needs = get_loss(config.recover_loss).needs_teacher
    return train, build_teacher(setup.model, train, fingerprint=setup.fingerprint, progress=False) if needs else None


def unstructured_model(config: DarwinConfig, prep: Prepared, genome: Genome, out: Path, evaluator,
                       zero_shot: ZeroShot | None = None) -> dict[str, Any]:
    """`evaluator`: a LevelEvaluator on `prep.setup` (its masks, windows and dense reference).

    Every allocation (uniform, OWL, the winner) is scored with the metric's masks on the dense model
    and, with `config.reconstruct`, again after sequential pruning with a least-squares refit of the
    kept weights (`metricgp.prune.engine.prune_sequential`), named `<allocation>+reconstruct`; with
    `zero_shot`, each one's accuracy too, next to the dense model's."""

    setup, t0 = prep.setup, time.perf_counter()
    masks = evaluator.masks
    masks.reset()
    accuracy = _dense_accuracy(config, setup, zero_shot)
    evals = _test_windows(config, setup)
    n = len(evaluator.windows)
    report: dict[str, Any] = {"perplexity": {"dense": _dense_ppl(config, setup, evals)}, "fitness": {}}
    db = prep.database
    allocations = {"uniform": [config.sparsity] * len(db.names),
                   "owl": owl_layer_sparsities(setup, config.sparsity),
                   "evopress": [db.sparsity_of(i, level) for i, level in enumerate(genome)]}

    def score(name: str) -> None:
        report["fitness"][name] = evaluator.objective.measure(setup.model, evaluator.windows, evaluator.reference, 4)
        report["perplexity"][name] = {d: perplexity(setup.model, w) for d, w in evals.items()}
        if zero_shot is not None:
            accuracy[name] = zero_shot.evaluate(setup.model, setup.tokenizer)

    for name, sparsities in allocations.items():
        masks.reset()
        masks.apply_sparsities(sparsities)
        score(name)
    if config.reconstruct:
        for name, sparsities in allocations.items():
            masks.reset()
            _reconstruct(setup, masks.metric, dict(zip(db.names, sparsities, strict=True)))
            score(f"{name}+reconstruct")
    if zero_shot is not None:
        report["zero_shot"] = zero_shot_report(zero_shot, accuracy)
    masks.reset()
    masks.apply(genome)
    report["sparsity"] = 1 - prep.space.kept_fraction(genome)
    report["layer_sparsity"] = {name: dict(zip(db.names, s, strict=True)) for name, s in allocations.items()}
    report["fitness_windows"] = n
    if config.save_model:
        setup.model.save_pretrained(out / MODEL_DIR)
        setup.tokenizer.save_pretrained(out / MODEL_DIR)
        report["saved"] = MODEL_DIR
    masks.reset()
    report["evaluation"] = {d: {"windows": len(w), "tokens": int(w.numel())} for d, w in evals.items()}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _reconstruct(setup, metric, sparsities: dict[str, float]) -> None:
    """Sequential pruning at per-layer sparsities with the least-squares refit, on the dense model."""
    patterns = {name: Unstructured(s) for name, s in sparsities.items()}
    prune_sequential(setup.model, setup.calib, setup.stats, metric, patterns.__getitem__, reconstruct=True)
