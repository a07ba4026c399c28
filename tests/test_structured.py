"""Structured pruning: discovery on five families and made-up names, valid shapes after shrinking,
exact parameter accounting, keep maps, reductions and normalisations."""

from __future__ import annotations

import pytest
import torch
from structured_models import FAMILIES, MadeUpLM, family_model

from metricgp.errors import MetricGPError
from metricgp.expr import compile_metric, resolve_metric
from metricgp.structured.allocate import allocate, from_keep_map
from metricgp.structured.groups import decoder_params, discover, linears_by_name
from metricgp.structured.importance import REDUCTIONS, element_scores, normalise, score_units
from metricgp.structured.shrink import apply_plan, remove_blocks


def _units(model, metric="magnitude", head_mode="per-group", reduction="sum", normalisation="per-param"):
    modules = discover(model)
    linears = linears_by_name(model)
    names = {s.linear for m in modules for s in m.slices + m.kv_slices}
    scores = element_scores(compile_metric(resolve_metric(metric)), linears, {}, names)
    return modules, score_units(modules, linears, scores, reduction, normalisation, head_mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_finds_heads_and_channels(family):
    modules = discover(family_model(family))
    attn = [m for m in modules if m.kind == "attention"]
    mlp = [m for m in modules if m.kind == "mlp"]
    assert len(attn) == len(mlp) == 3
    assert all(m.n_elements == 4 and m.n_kv == 2 and m.group_size == 2 for m in attn)
    assert all(m.n_elements == 48 and len(m.slices) == 3 for m in mlp)
    # the query projection is told from K/V by width, the output projection by call order
    assert attn[0].slices[0].linear.endswith("q_proj") and attn[0].slices[1].linear.endswith("o_proj")
    assert {s.linear.rsplit(".", 1)[1] for s in attn[0].kv_slices} == {"k_proj", "v_proj"}
    assert mlp[0].slices[-1].linear.endswith("down_proj")


def test_discovery_with_made_up_names():
    modules = discover(MadeUpLM())
    attn = next(m for m in modules if m.kind == "attention")
    mlp = next(m for m in modules if m.kind == "mlp")
    assert [s.linear for s in attn.slices] == ["cells.0.mix.read", "cells.0.mix.write"]
    assert [s.linear for s in mlp.slices] == ["cells.0.ff.w_a", "cells.0.ff.w_b", "cells.0.ff.w_c"]


def test_square_query_projection_is_not_taken_for_the_output():
    # hidden 32 = 4 heads x 8: q_proj and o_proj are both 32x32; only call order separates them
    modules = discover(family_model("llama"))
    assert modules[0].slices[0].linear == "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head_mode", ["per-group", "kv-group"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_shrunk_model_is_exact_and_runs(family, head_mode, allocation):
    model = family_model(family)
    modules, units = _units(model, head_mode=head_mode)
    total = decoder_params(model)
    target = round(0.6 * total)
    removed = allocate(units, total - target, allocation)
    predicted = total - sum(u.params for u in removed)
    assert any(u.kind == "head" for u in removed) or allocation == "global"
    apply_plan(model, modules, removed)
    achieved = decoder_params(model)
    assert achieved == predicted  # exact accounting
    assert 0 <= achieved - target < max(u.params for u in units)  # within one structure of the target
    for attn in (m for m in discover(model) if m.kind == "attention"):
        module = model.get_submodule(attn.name)
        assert module.num_key_value_groups * attn.n_kv == attn.n_elements  # GQA stays valid
        if head_mode == "per-group":
            assert attn.n_kv == 2  # K/V heads kept
    ids = torch.randint(0, 300, (2, 12))
    assert model(ids).logits.shape == (2, 12, 300)
    out = model.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 16)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_shrinking_keeps_the_output_of_the_remaining_heads():
    """Removing a head whose o_proj columns are zero changes nothing."""
    model = family_model("llama")
    modules = discover(model)
    attn = modules[0]
    o = model.get_submodule(attn.slices[1].linear)
    with torch.no_grad():
        o.weight[:, 0:8] = 0  # head 0 of group 0 writes nothing ...
        o.weight[:, 16:24] = 0  # ... nor head 2 of group 1
    ids = torch.randint(0, 300, (1, 10))
    before = model(ids).logits
    _, units = _units(model)
    unit = next(u for u in units if u.module == attn.name and u.members == (0, 2))
    apply_plan(model, modules, [unit])
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
    assert model.get_submodule(attn.name).num_key_value_groups == 1


def test_block_removal_renumbers_cache_slots_and_layer_types():
    model = family_model("gemma3", layers=4)
    types = list(model.config.layer_types)
    remove_blocks(model, [1])
    assert model.config.num_hidden_layers == 3
    assert model.config.layer_types == [types[0], types[2], types[3]]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    ids = torch.randint(0, 300, (1, 8))
    assert model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True).shape == (1, 11)


def test_keep_map_and_its_errors():
    model = family_model("llama")
    modules, units = _units(model)
    mlp = next(m for m in modules if m.kind == "mlp")
    removed = from_keep_map(units, {mlp.name: 0.25})
    assert len(removed) == 36 and {u.module for u in removed} == {mlp.name}
    assert all(u.norm <= min(v.norm for v in units if v.module == mlp.name and v not in removed) for u in removed)
    with pytest.raises(MetricGPError, match="unknown module"):
        from_keep_map(units, {"model.layers.9.mlp": 0.5})
    with pytest.raises(MetricGPError, match=r"\[0, 1\]"):
        from_keep_map(units, {mlp.name: 1.5})


def test_reductions_on_a_hand_example():
    model = MadeUpLM(depth=1)
    modules = discover(model)
    mlp = next(m for m in modules if m.kind == "mlp")
    linears = linears_by_name(model)
    scores = {n: torch.zeros_like(linears[n].weight) for s in mlp.slices for n in [s.linear]}
    scores["cells.0.ff.w_a"][3, :] = 1.0  # channel 3: 32 ones in w_a's row ...
    scores["cells.0.ff.w_c"][:, 3] = 2.0  # ... and 32 twos in w_c's column
    expect = {"sum": 96.0, "mean": 96.0 / 96, "l2": (32 + 32 * 4) ** 0.5, "max": 2.0}
    for name in REDUCTIONS:
        units = score_units([mlp], linears, scores, name, "none")
        assert units[3].score == pytest.approx(expect[name])
        assert all(u.score == 0 for u in units if u.members != (3,))


def test_normalisations_compare_units_within_their_module():
    model = family_model("llama")
    _, units = _units(model, normalisation="none")
    z = normalise(units, "module-zscore")
    per_module = {}
    for u in z:
        per_module.setdefault(u.module, []).append(u.norm)
    for values in per_module.values():
        if len(values) > 1:
            assert abs(sum(values) / len(values)) < 1e-9
    pp = normalise(units, "per-param")
    assert all(u.norm == pytest.approx(u.score / u.params) for u in pp)


def test_unknown_choices_are_user_errors():
    model = family_model("llama")
    _, units = _units(model)
    with pytest.raises(MetricGPError, match="unknown allocation"):
        allocate(units, 100, "sideways")
    with pytest.raises(MetricGPError, match="unknown normalisation"):
        normalise(units, "nope")


@pytest.mark.parametrize("head_mode", ["per-group", "kv-group"])
def test_masking_gives_the_logits_of_shrinking(head_mode):
    """The search's fitness masks instead of copying and shrinking; both must be the same model."""
    import copy

    from metricgp.structured.shrink import mask_plan

    model = family_model("qwen2")  # q/k/v biases: masking o_proj columns must still be exact
    modules, units = _units(model, head_mode=head_mode)
    removed = allocate(units, decoder_params(model) // 3, "global")
    assert any(u.kind == "head" for u in removed) and any(u.kind == "channel" for u in removed)
    shrunk = copy.deepcopy(model)
    apply_plan(shrunk, modules, removed)
    mask_plan(model, modules, removed)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, shrunk(ids).logits, atol=1e-5)
