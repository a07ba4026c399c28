"""The level search on a tiny 4-block Llama: the database, masking = shrinking, KL by hand, in-loop
training that cannot regrow pruned structures, exact resume, the command line and its errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from metricgp.darwin.config import DarwinConfig, prepare
from metricgp.darwin.database import LevelDatabase
from metricgp.darwin.fitness import Candidate, build_evaluator
from metricgp.structured.groups import decoder_params

SEQLEN = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared, busy CPU: one thread is ~100x faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METRICGP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny4_dir(tmp_path_factory, tiny_llama_dir):
    """The shared tiny Llama's tokenizer with a 4-block model (more genes to search)."""
    from conftest import save_tiny_variant

    return save_tiny_variant(tmp_path_factory.mktemp("tiny4"), tiny_llama_dir, num_hidden_layers=4)


def make_config(model, text_files, **fields) -> DarwinConfig:
    base = dict(spec={"model": str(model), "calib": str(text_files["calib"]), "n_calib": 4, "seqlen": SEQLEN,
                      "seed": 0}, metric="mul(abs(W), sqrt(X))", keep=0.7, fitness_data=str(text_files["calib"]),
                dataset=str(text_files["test"]), eval_windows=2, offspring=6, generations=3,
                stages=({"survivors": 3, "windows": 1, "train_tokens": 0}, {"survivors": 1, "windows": 2,
                                                                            "train_tokens": 0}), screen=4, speed=False)
    return DarwinConfig(**{**base, **fields}).validate()


@pytest.fixture(scope="module")
def prepared(tiny4_dir, text_files, module_cache):
    config = make_config(tiny4_dir, text_files)
    prep = prepare(config)
    return config, prep, build_evaluator(config.recipe(prep.database), prep.setup)


def random_genomes(space, n: int, seed: int = 0):
    rng = random.Random(seed)
    return [tuple(rng.randint(0, g.max_level) for g in space.genes) for _ in range(n)]


def test_database_levels_are_evenly_spaced_and_stored_compactly(prepared, tmp_path):
    config, prep, evaluator = prepared
    db, space = prep.database, prep.space
    assert [g.kind for g in space.genes] == ["attention", "mlp"] * 4
    assert db.step_units == {"attention": 1, "mlp": 6}  # 2 head units (1 head per KV group) and 64 channels
    assert [g.max_level for g in space.genes[:2]] == [1, 10]
    for i, gene in enumerate(space.genes):
        norms = [u.norm for u in db.order[i]]
        assert norms == sorted(norms)  # least important first
        members = [m for u in db.order[i] for m in u.members]
        assert len(members) == len(set(members))
        for level in range(gene.max_level + 1):  # the same parameter step at every level of a type
            assert sum(u.params for u in db.units_at(i, level)) == level * gene.step
        assert gene.step == space.genes[i % 2].step
    for genome in random_genomes(space, 3):  # the size bookkeeping is exact on the shrunk model
        model = evaluator.masks.build(genome)
        assert decoder_params(model) == space.total - space.removed(genome)
    stored = db.save(tmp_path / "db.json")
    again = LevelDatabase.load(tmp_path / "db.json")
    assert again.order == db.order and again.space == space
    disk = db.disk_report(stored, 4)
    assert disk["stored_bytes"] == (tmp_path / "db.json").stat().st_size < disk["full_copies_bytes"]


def test_prior_start_follows_the_importances_at_the_same_size(prepared):
    from metricgp.darwin.levels import start_genome
    from metricgp.darwin.prior import allocation_start

    config, prep, _ = prepared
    space, db = prep.space, prep.database
    uniform = start_genome(space, prep.budget)
    finest = min(g.step for g in space.genes)
    for genome in (prep.start, uniform):  # the same size, to half the finest step
        assert abs(space.removed(genome) - prep.budget) * 2 <= finest
    assert prep.start != uniform  # the global ranking of units does not prune every module alike
    weights, _ = allocation_start(db, prep.budget)
    mlp = [i for i, k in enumerate(db.kinds) if k == "mlp"]
    heaviest = max(mlp, key=lambda i: weights[i])
    assert prep.start[heaviest] == max(prep.start[i] for i in mlp)


def test_masking_swaps_only_changed_modules_and_equals_shrinking(prepared):
    config, prep, evaluator = prepared
    masks, model = evaluator.masks, prep.setup.model
    ids = evaluator.windows[:2]
    a, b = random_genomes(prep.space, 2, seed=3)
    masks.reset()
    masks.apply(a)
    swapped = masks.apply(b)
    assert swapped == sum(x != y for x, y in zip(a, b, strict=True))
    incremental = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks.reset()
    masks.apply(b)
    assert all(torch.equal(p, incremental[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        shrunk = masks.build(b)(input_ids=ids).logits
    torch.testing.assert_close(masked, shrunk, rtol=1e-5, atol=1e-5)


def test_kl_fitness_matches_a_hand_computation(prepared):
    config, prep, evaluator = prepared
    genome = random_genomes(prep.space, 1, seed=5)[0]
    got = evaluator.evaluate(Candidate(genome), 2)
    assert got.n_windows == 2 and got.reason is None
    assert got.sparsity == pytest.approx(prep.space.removed(genome) / prep.space.total)
    shrunk = evaluator.masks.build(genome)  # resets the masks: the model is dense again
    total, exact, count = 0.0, 0.0, 0
    with torch.no_grad():
        for window in evaluator.windows[:2]:
            logp = F.log_softmax(prep.setup.model(input_ids=window[None]).logits[0].double(), -1)
            logq = F.log_softmax(shrunk(input_ids=window[None]).logits[0].double(), -1)
            top = logp.topk(256, dim=-1).indices  # the dense top-256 support, the rest one bucket
            p, lp, lq = logp.exp().gather(-1, top), logp.gather(-1, top), logq.gather(-1, top)
            p_tail, q_tail = 1 - p.sum(-1), 1 - lq.exp().sum(-1)
            kl = (p * (lp - lq)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
            total += kl.sum().item()
            exact += (logp.exp() * (logp - logq)).sum().item()
            count += kl.numel()
    assert got.fitness == pytest.approx(total / count, rel=1e-4)
    assert 0 < got.fitness <= exact / count * (1 + 1e-4)  # a coarser partition: never above the full KL
    zero = evaluator.evaluate(Candidate(tuple(0 for _ in genome)), 2).fitness
    assert abs(zero) < 1e-6  # the dense genome


def test_in_loop_training_keeps_pruned_structures_pruned(tiny4_dir, text_files, module_cache):
    from metricgp.structured.evaluator import per_layer_sizes

    config = make_config(tiny4_dir, text_files, stages=(
        {"survivors": 2, "windows": 1, "train_tokens": 64}, {"survivors": 1, "windows": 2, "train_tokens": 128}))
    prep = prepare(config)
    evaluator = build_evaluator(config.recipe(prep.database), prep.setup)
    genome = prep.start
    dense = {n: p.detach().clone() for n, p in prep.setup.model.named_parameters()}
    untrained = evaluator.masks.build(genome)
    trained = evaluator.trained(genome, 128)
    sizes = per_layer_sizes(trained)
    db = prep.database
    for i, (name, level) in enumerate(zip(db.names, genome, strict=True)):
        block = int(name.split(".")[2])
        kept = len(db.order[i]) - len(db.units_at(i, level))
        key = "num_attention_heads" if db.kinds[i] == "attention" else "intermediate_size"
        full = 4 if db.kinds[i] == "attention" else 64
        per_unit = 2 if db.kinds[i] == "attention" else 1  # a head unit: one query head of each KV group
        assert sizes.get(block, {}).get(key, full) == kept * per_unit
    assert decoder_params(trained) == prep.space.total - prep.space.removed(genome)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, untrained.get_parameter(n))]
    assert changed  # training happened, on the smaller shapes only
    assert all(torch.equal(p, dense[n]) for n, p in prep.setup.model.named_parameters())  # dense untouched
    result = evaluator.evaluate(Candidate(genome, 64), 1)
    assert result.reason is None and result.fitness > 0


def test_in_loop_training_is_lora_by_default_and_an_older_run_resumes_as_it_began(tiny4_dir, text_files):
    from dataclasses import asdict

    config = make_config(tiny4_dir, text_files)
    assert config.train_method == "lora"
    older = {k: v for k, v in asdict(config).items() if k != "train_method"}  # a config.json of before the change
    assert DarwinConfig.from_dict(older).train_method == "full"
    assert DarwinConfig.from_dict(asdict(config)).train_method == "lora"


def test_in_loop_kd_training_distils_from_the_dense_model(tiny4_dir, text_files, module_cache):
    """--train-loss kd: the dense model's top-k on the training windows is taken once, before any candidate
    is built, and a candidate trained on it moves towards the dense model (lower KL fitness)."""
    config = make_config(tiny4_dir, text_files, train_loss="kd", train_lr=1e-3, stages=(
        {"survivors": 2, "windows": 1, "train_tokens": 64}, {"survivors": 1, "windows": 2, "train_tokens": 128}))
    prep = prepare(config)
    evaluator = build_evaluator(config.recipe(prep.database), prep.setup)
    assert evaluator.teacher is not None and evaluator.recipe.training.loss == "kd"
    untrained = evaluator.evaluate(Candidate(prep.start), 2).fitness
    trained = evaluator.evaluate(Candidate(prep.start, 128), 2).fitness
    assert 0 < trained < untrained


def cli_args(model, text_files, out, *extra: str) -> list[str]:
    """A small structured run at 70% kept with a 2,1 schedule; `extra` adds or overrides options."""
    return ["--model", str(model), "--calib", str(text_files["calib"]), "--n-calib", "4", "--seqlen", str(SEQLEN),
            "--dataset", str(text_files["test"]), "--eval-windows", "2", "--keep", "0.7", "--survivors", "2,1",
            "--fitness-windows", "1,2", "--no-progress", "--out", str(out), *extra]


def _log(out):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_equals_an_uninterrupted_training_aware_run(tiny4_dir, text_files, module_cache, tmp_path):
    from metricgp.darwin.run import resume, start

    config = make_config(tiny4_dir, text_files, generations=4, save_model=False, stages=(
        {"survivors": 3, "windows": 1, "train_tokens": 32}, {"survivors": 2, "windows": 1, "train_tokens": 64},
        {"survivors": 1, "windows": 2, "train_tokens": 64}))
    full, part = tmp_path / "full", tmp_path / "part"
    start(config, full)
    start(config, part, stop_after=2)
    assert len(_log(part)) == 3 and not (part / "report.json").exists()
    search = resume(part)
    assert search.gen == 4
    assert _log(part) == _log(full)
    for name in ("best.json", "levels.txt"):
        assert (part / name).read_text() == (full / name).read_text()
    report = lambda d: {k: v for k, v in json.loads((d / "report.json").read_text()).items() if k != "seconds"}  # noqa: E731
    assert report(part) == report(full)
    log = _log(full)
    assert all(r["evaluations_per_stage"][0] <= 4 for r in log[1:])  # screened: 4 of 6 offspring
    assert len({r["kept"] for r in log}) == 1
    saved = json.loads((full / "config.json").read_text())
    assert [s["train_tokens"] for s in saved["schedule"]] == [32, 64, 64]
    assert saved["fitness_windows"]["split"] == "calibration"


def test_cli_run_resume_and_reload(tiny4_dir, text_files, module_cache, tmp_path, capsys):
    import metricgp
    from metricgp.darwin.__main__ import main

    out = tmp_path / "darwin-k70"
    args = cli_args(tiny4_dir, text_files, out, "--metric", "taylor", "--offspring", "4", "--generations", "2",
                    "--no-prior", "--recover-tokens", "64")
    assert main(args) == 0
    assert "best: kept" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["metric"] == "mul(abs(W), G)" and not config["config"]["prior"]
    assert config["config"]["screen"] is None and "command" in config and "git" in config
    assert config["database"]["full_copies_bytes"] > config["database"]["stored_bytes"]
    log = _log(out)
    assert [r["gen"] for r in log] == [0, 1, 2] and all("spearman_predicted_vs_first_stage" in r for r in log)
    for name in ("fitness.png", "levels.png"):
        assert (out / name).stat().st_size > 1000
    assert main(["--resume", str(out), "--generations", "3", "--no-progress"]) == 0
    assert [r["gen"] for r in _log(out)] == [0, 1, 2, 3]
    resumed = json.loads((out / "config.json").read_text())["resumes"]
    assert resumed[0]["from_generation"] == 2 and resumed[0]["overrides"] == {"generations": 3}
    report = json.loads((out / "report.json").read_text())
    best = json.loads((out / "best.json").read_text())
    assert report["genome"] == best["genome"] and abs(best["kept"] - 0.7) < 0.02
    model = metricgp.load_pruned(out / "model")
    assert decoder_params(model) == report["size"]["decoder_params"]["pruned"]
    assert report["recovery"]["tokens"] == 64 and report["recovery"]["steps"] == 2
    assert report["reloaded"]["perplexity"] == report["perplexity"]["recovered"]  # the recovered model, saved
    speed = report["speed"]  # timed against dense in the same run, next to the ratios that bound it
    assert speed["param_ratio"] == pytest.approx(report["size"]["params"]["dense"] / report["size"]["params"]["pruned"])
    assert speed["prefill_speedup"] > 0 and speed["flops_ratio"] > 1
    assert "| recovered |" in (out / "README.md").read_text() and "Speed vs dense" in (out / "README.md").read_text()
    levels = (out / "levels.txt").read_text().splitlines()
    assert len(levels) == 1 + 8 + 1 and levels[1].startswith("model.layers.0.self_attn  attention")


# ---------------------------------------------------------------- the levels' least-squares weight update


def test_refit_is_the_least_squares_optimum_and_plain_masking_for_uncorrelated_inputs():
    from metricgp.structured.refit import refit_columns

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen,
                                                                               dtype=torch.float64)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    removed, kept = [1, 4, 7], [c for c in range(12) if c not in (1, 4, 7)]
    got = refit_columns(w, x.T @ x / len(x), removed, ridge=0.0)
    best = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T  # min || X W^T - X_K W_K'^T ||
    assert torch.equal(got[:, removed], torch.zeros(5, 3, dtype=torch.float64))
    torch.testing.assert_close(got[:, kept], best, rtol=1e-8, atol=1e-8)
    plain = w.clone()
    plain[:, removed] = 0
    assert ((x @ (w - got).T) ** 2).sum() < ((x @ (w - plain).T) ** 2).sum()
    torch.testing.assert_close(refit_columns(w, torch.eye(12, dtype=torch.float64), removed, ridge=0.0), plain)


@pytest.fixture(scope="module")
def refitted(tiny4_dir, text_files, module_cache):
    config = make_config(tiny4_dir, text_files, update="ls")
    prep = prepare(config)
    return config, prep, build_evaluator(config.recipe(prep.database), prep.setup)


def test_updated_levels_swap_exactly_equal_shrinking_and_fit_the_dense_output_better(refitted):
    config, prep, evaluator = refitted
    masks, model = evaluator.masks, prep.setup.model
    assert masks.refit is not None
    a, b = random_genomes(prep.space, 2, seed=7)
    masks.reset()
    masks.apply(a)
    masks.apply(b)
    incremental = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks.reset()
    masks.apply(b)
    assert all(torch.equal(p, incremental[n]) for n, p in model.named_parameters())
    ids = evaluator.windows[:2]
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        shrunk = masks.build(b)(input_ids=ids).logits
    torch.testing.assert_close(masked, shrunk, rtol=1e-5, atol=1e-5)
    dense = prep.setup.dense.weights
    touched = 0
    for i, level in enumerate(b):  # the module output's error on calibration inputs: tr((W - W') H (W - W')^T)
        module, units = masks.pruner.modules[i], prep.database.units_at(i, level)
        if not units:
            continue
        name = module.slices[-1].linear
        h, w = masks.refit.hessians[name].double(), dense[name].double()
        plain = w.clone()
        mask_columns = [c for u in units for m in u.members for c in range(m * module.slices[-1].size,
                                                                           (m + 1) * module.slices[-1].size)]
        plain[:, mask_columns] = 0
        err = [float(((w - v) @ h * (w - v)).sum()) for v in (masks.refit.weight(module, units).double(), plain)]
        assert err[0] < err[1], name
        touched += 1
    assert touched


def test_the_update_is_recorded_and_carried_into_the_saved_model(tiny4_dir, text_files, module_cache, tmp_path):
    import metricgp
    from metricgp.darwin.__main__ import main

    out = tmp_path / "darwin-ls"
    args = cli_args(tiny4_dir, text_files, out, "--metric", "wanda", "--offspring", "2", "--generations", "1",
                    "--update", "ls", "--no-speed")
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["update"] == "ls" and config["database"]["update_bytes"] > 0
    assert "weight update adds" in (out / "README.md").read_text()
    report = json.loads((out / "report.json").read_text())
    model = metricgp.load_pruned(out / "model")
    assert report["reloaded"]["perplexity"] == report["perplexity"]["pruned"]
    prep = prepare(DarwinConfig.from_dict(config["config"]))
    recipe = DarwinConfig.from_dict(config["config"]).recipe(prep.database)
    assert recipe.update == "ls"
    masks = build_evaluator(recipe, prep.setup).masks
    expected = masks.build(tuple(report["genome"]))
    for (n, p), (m, q) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n


@pytest.mark.parametrize(("extra", "message"), [
    (["--update", "nope"], "unknown weight update 'nope'"),
    (["--unstructured", "--update", "ls"], "--update needs structured pruning"),
    (["--keep", "0.1"], "--keep 0.1 is unreachable: the level database spans kept fractions"),
    (["--keep", "1.5"], "--keep must be in (0, 1]"),
    (["--survivors", "2,2"], "--survivors must decrease strictly to 1"),
    (["--unstructured", "--train-tokens", "1k,2k"], "needs structured pruning"),
    (["--train-loss", "kl"], "unknown training loss 'kl'"),
    (["--recover-tokens", "64", "--recover-loss", "mse"], "unknown recovery loss 'mse'"),
])
def test_cli_bad_input_exits_2_with_one_error_line(tiny4_dir, text_files, module_cache, tmp_path, capsys, extra,
                                                   message):
    from metricgp.darwin.__main__ import main

    out = tmp_path / "bad"
    args = ["--model", str(tiny4_dir), "--calib", str(text_files["calib"]), "--n-calib", "4", "--seqlen",
            str(SEQLEN), "--metric", "wanda", "--no-progress", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_screening_is_off_unless_asked(tiny4_dir, text_files, tmp_path):
    from metricgp.cli.darwin import build_parser, config_from_args

    def screen(*extra: str):
        args = build_parser().parse_args(cli_args(tiny4_dir, text_files, tmp_path / "run", "--metric", "wanda",
                                                  "--offspring", "6", *extra))
        return config_from_args(args).screen

    assert screen() is None  # every offspring goes to the first stage
    assert screen("--screen", "4") == 4
    assert screen("--screen", "4", "--no-prior") is None


def test_resume_at_the_last_generation_adds_the_reconstruct_rows(tiny4_dir, text_files, module_cache, tmp_path):
    from metricgp.darwin.__main__ import main

    out = tmp_path / "evo"
    args = cli_args(tiny4_dir, text_files, out, "--unstructured", "--sparsity", "0.5", "--levels", "20",
                    "--offspring", "4", "--generations", "1", "--metric", "wanda", "--no-save-model")
    assert main(args) == 0
    before = json.loads((out / "report.json").read_text())
    assert set(before["fitness"]) == {"uniform", "owl", "evopress"}
    assert main(["--resume", str(out), "--generations", "1", "--reconstruct", "--no-progress"]) == 0
    assert [r["gen"] for r in _log(out)] == [0, 1]  # no generation added: only the final report again
    after = json.loads((out / "report.json").read_text())
    assert after["genome"] == before["genome"]
    assert set(after["fitness"]) == {"uniform", "owl", "evopress", "uniform+reconstruct", "owl+reconstruct",
                                     "evopress+reconstruct"}
    assert after["fitness"]["evopress"] == pytest.approx(before["fitness"]["evopress"])
    resumed = json.loads((out / "config.json").read_text())["resumes"]
    assert resumed[-1]["overrides"] == {"generations": 1, "reconstruct": True}
    assert main(["--resume", str(out), "--sparsity", "0.6", "--no-progress"]) == 2


def test_evopress_unstructured_levels_are_exact_with_baselines(tiny4_dir, text_files, module_cache,
                                                                         tmp_path):
    from metricgp.darwin.run import start

    config = make_config(tiny4_dir, text_files, unstructured=True, sparsity=0.5, levels=20, generations=3,
                         save_model=False, reconstruct=True)
    out = tmp_path / "evo"
    search = start(config, out)
    space = search.space
    assert abs(space.removed(search.parent) - 0.5 * space.total) * 2 <= min(g.step for g in space.genes)
    prep = prepare(config)
    evaluator = build_evaluator(config.recipe(prep.database), prep.setup)
    for genome in [search.parent, *random_genomes(space, 2)]:  # zeros counted on the masked model
        evaluator.masks.apply(genome)
        zeros = sum(int((layer.weight == 0).sum()) for layer in prep.setup.layers.values())
        assert zeros == space.removed(genome)
    report = json.loads((out / "report.json").read_text())
    allocations = {"uniform", "owl", "evopress"}
    assert set(report["fitness"]) == allocations | {f"{a}+reconstruct" for a in allocations}
    assert set(report["perplexity"]) == {"dense"} | set(report["fitness"])
    assert report["fitness"]["uniform+reconstruct"] != report["fitness"]["uniform"]
    evopress = report["layer_sparsity"]["evopress"]
    assert list(evopress.values()) == [prep.database.sparsity_of(i, lv) for i, lv in enumerate(search.parent)]
    kinds = {g.kind for g in space.genes}
    assert kinds == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    best = json.loads((out / "best.json").read_text())
    assert len(best["sparsity_per_layer"]) == len(space.genes)


def test_reconstruction_at_per_layer_sparsities_keeps_each_layers_mask(tiny4_dir, text_files, module_cache):
    """EvoPress/OWL allocations + least-squares refit: each layer pruned at its own sparsity (zeros
    counted per row), the kept weights moved off their dense values, and the dense model restorable."""
    from metricgp.darwin.final import _reconstruct

    config = make_config(tiny4_dir, text_files, unstructured=True, sparsity=0.5, levels=20)
    prep = prepare(config)
    masks = build_evaluator(config.recipe(prep.database), prep.setup).masks
    setup = prep.setup
    names = prep.database.names
    sparsities = {n: (0.25, 0.5, 0.75)[i % 3] for i, n in enumerate(names)}
    _reconstruct(setup, masks.metric, sparsities)
    for name in names:
        weight, dense = setup.layers[name].weight, setup.dense.weights[name]
        per_row = (weight == 0).sum(dim=1)
        assert (per_row == round(sparsities[name] * weight.shape[1])).all()
        kept = weight != 0
        assert not torch.equal(weight[kept], dense[kept])  # refitted, not just masked
    masks.reset()
    assert all(torch.equal(setup.layers[n].weight, setup.dense.weights[n]) for n in names)


def test_async_dispatch_runs_resumes_exactly_and_keeps_the_size(tiny4_dir, text_files, module_cache, tmp_path):
    """`--dispatch async` on a model: a stopped and resumed run equals an uninterrupted one (the jobs in
    flight at the checkpoint are made again, to the same results), and every genome keeps the budget."""
    from metricgp.darwin.run import resume, start

    config = make_config(tiny4_dir, text_files, generations=3, save_model=False, dense_eval=False, dispatch="async",
                         lag=3)
    full, part = tmp_path / "full", tmp_path / "part"
    start(config, full)
    start(config, part, stop_after=1)
    resume(part)
    strip = lambda d: [{k: v for k, v in r.items() if k != "worker_idle_share"} for r in _log(d)]  # noqa: E731
    assert strip(part) == strip(full) and len(strip(full)) == 4
    log = _log(full)
    assert all(r["evaluations_per_stage"][0] >= 4 for r in log[1:])  # a generation = 4 screened children scored
    assert len({r["kept"] for r in log}) == 1
    assert json.loads((full / "config.json").read_text())["config"]["dispatch"] == "async"


def test_an_offloaded_level_search_equals_the_resident_one(tiny4_dir, text_files, module_cache, tmp_path):
    from metricgp.darwin.run import start

    resident = make_config(tiny4_dir, text_files, generations=2, save_model=False)
    offloaded = make_config(tiny4_dir, text_files, generations=2, save_model=False,
                            spec={**resident.spec, "offload": True})
    start(resident, tmp_path / "resident")
    start(offloaded, tmp_path / "offloaded")
    assert _log(tmp_path / "offloaded") == _log(tmp_path / "resident")
    for name in ("best.json", "levels.txt"):
        assert (tmp_path / "offloaded" / name).read_text() == (tmp_path / "resident" / name).read_text()


def test_in_loop_training_under_offload_is_a_one_line_error(tiny4_dir, text_files, module_cache, tmp_path, capsys):
    from metricgp.darwin.__main__ import main

    out = tmp_path / "d"
    assert main(cli_args(tiny4_dir, text_files, out, "--offload", "--train-tokens", "32,64")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--offload" in err and not out.exists()
