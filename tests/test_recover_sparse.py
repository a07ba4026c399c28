"""The recovery library (`metricgp.recover`) on tiny random Llamas: masks that survive training, KD from the
dense model's cached top-k, the chunked student loss, schedules, checkpoints and an exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

import metricgp.blocks
from metricgp.errors import MetricGPError
from metricgp.models import prunable_layers
from metricgp.prune.patterns import NM, Unstructured
from metricgp.recover import build_teacher, kl_per_position, recover, sparse_masks, training_windows
from metricgp.recover.loop import lr_factor
from metricgp.recover.losses import LOSSES, backward_loss, tail_logp
from metricgp.recover.methods import MaskedLoRALinear
from metricgp.structured.recover import recover as structured_recover

SEQLEN = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def sharp(seed: int = 0) -> nn.Module:
    """A tiny random Llama whose next-token distributions are far from uniform (so KL has something to see)."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
        for layer in prunable_layers(model).values():
            layer.weight.mul_(10)
    return model


def pruned(pattern, seed: int = 0, model: nn.Module | None = None) -> nn.Module:
    """A tiny Llama with every block linear pruned by magnitude to `pattern`."""
    model = model if model is not None else tiny_model("llama", seed=seed)
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            layer.weight.mul_(pattern.mask(layer.weight.abs()))
    return model


def zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in prunable_layers(model).items()}


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)], ids=["50%", "2:4"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_masked_recovery_keeps_every_zero_and_changes_the_kept_weights(pattern, method):
    model = pruned(pattern)
    before, dense = zeros(model), {n: m.weight.clone() for n, m in prunable_layers(model).items()}
    shape = {n: type(m) for n, m in model.named_modules()}
    loss_before = model(input_ids=windows(), labels=windows()).loss.item()
    report = recover(model, windows(), method=method, tokens=8 * 4 * SEQLEN, batch_size=4, lr=1e-2,
                     masks=sparse_masks(model), progress=False)
    after = zeros(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # the same zeros, so every N:M group holds
    changed = [n for n, m in prunable_layers(model).items() if not torch.equal(m.weight, dense[n])]
    assert len(changed) == len(dense)
    assert {n: type(m) for n, m in model.named_modules()} == shape and not model.training
    assert report.masked_layers == len(dense) and report.tokens_per_second > 0
    with torch.no_grad():
        assert model(input_ids=windows(), labels=windows()).loss.item() < loss_before


def test_without_masks_full_training_fills_the_zeros():
    """The masks are what keeps the pattern: the same run without them regrows pruned weights."""
    model = pruned(Unstructured(0.5))
    before = zeros(model)
    recover(model, windows(), method="full", tokens=2 * SEQLEN, lr=1e-2, progress=False)
    assert sum(int((before[n] & ~z).sum()) for n, z in zeros(model).items()) > 0


def test_masked_adapter_trains_what_it_merges():
    """Forward and gradients of the masked adapter are those of W + s (B A) * M (float64 gradcheck)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6).double()
    mask = torch.rand(6, 8) > 0.5
    layer = MaskedLoRALinear(base, rank=2, alpha=4, mask=mask)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    expected = nn.functional.linear(x, base.weight + layer.delta(), base.bias)
    assert torch.allclose(layer(x), expected)
    assert torch.all(layer.delta()[~mask] == 0)
    base.requires_grad_(False)
    # gradcheck perturbs its inputs in place: A and B are the layer's own parameters
    assert torch.autograd.gradcheck(lambda x, _a, _b: layer(x), (x, layer.A, layer.B))


def test_group_lora_refuses_masks():
    model = pruned(Unstructured(0.5))
    with pytest.raises(MetricGPError, match="cannot keep a sparsity pattern"):
        structured_recover(model, windows(), method="group-lora", tokens=SEQLEN, masks=sparse_masks(model),
                           progress=False)


def test_kd_is_exactly_zero_for_a_student_equal_to_its_teacher():
    logits = torch.randn(7, 50, dtype=torch.float32) * 3
    logp = logits.log_softmax(-1)
    for k in (5, 50):  # a tail bucket, and the whole vocabulary (no tail)
        top = logp.topk(k, dim=-1)
        tail = tail_logp(logp, top.indices)
        assert torch.equal(kl_per_position(logp, top.indices, top.values, tail), torch.zeros(7))
    other = (logits + torch.randn(7, 50)).log_softmax(-1)
    top = logp.topk(5, dim=-1)
    kl = kl_per_position(other, top.indices, top.values, tail_logp(logp, top.indices))
    exact = (logp.exp() * (logp - other)).sum(-1)
    assert torch.all(kl > 0) and torch.all(kl <= exact + 1e-6)  # bucketing the tail loses information, never adds


def test_teacher_cache_is_keyed_and_kd_of_the_dense_model_is_zero(isolated_cache):
    model, train = tiny_model("llama"), windows(6)
    teacher = build_teacher(model, train, k=300, progress=False)
    assert (teacher.path / "meta.json").is_file() and teacher.k == 300
    idx, logp, tail = teacher.read(torch.tensor([4, 1]), torch.device("cpu"))
    assert idx.shape == (2 * SEQLEN, 300) and logp.shape == idx.shape and tail.shape == (2 * SEQLEN,)
    with pytest.MonkeyPatch.context() as patch:  # a second build reads the cache
        patch.setattr("metricgp.recover.losses.logit_chunks", _refuse)
        assert build_teacher(model, train, k=300, progress=False) == teacher
    assert build_teacher(model, train, k=16, progress=False).path != teacher.path
    assert build_teacher(model, windows(6, seed=1), k=300, progress=False).path != teacher.path
    head = metricgp.blocks.output_head(model)
    for k, t in ((300, teacher), (16, build_teacher(model, train, k=16, progress=False))):
        rows = torch.tensor([4, 1])
        value = backward_loss(model, head, train[rows], LOSSES["kd"], t.read(rows, torch.device("cpu")))
        assert abs(value) < 1e-6, k  # the same model through the training path: zero up to float rounding


def _refuse(*_args, **_kwargs):
    raise AssertionError("the teacher was computed again")


def test_chunked_student_loss_equals_the_models_own_loss(monkeypatch):
    model = tiny_model("llama")
    ids = windows(3)
    monkeypatch.setattr(metricgp.blocks, "LOGIT_CHUNK_ELEMENTS", 300 * 5)  # 5 positions per chunk
    head = metricgp.blocks.output_head(model)
    assert head.positions_per_chunk == 5
    value = backward_loss(model, head, ids, LOSSES["ce"])
    chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(input_ids=ids, labels=ids).loss
    reference.backward()
    assert value == pytest.approx(reference.item(), rel=1e-5)
    assert chunked and all(torch.allclose(p.grad, chunked[n], atol=1e-6) for n, p in model.named_parameters()
                           if p.grad is not None)


def test_kd_recovery_moves_the_pruned_model_towards_the_dense_one(isolated_cache):
    dense, train = sharp(), windows(4)
    teacher = build_teacher(dense, train, k=32, progress=False)
    model = pruned(Unstructured(0.5), model=sharp())
    head = metricgp.blocks.output_head(model)

    def kd() -> float:
        value = backward_loss(model, head, train, LOSSES["kd"], teacher.read(torch.arange(4), torch.device("cpu")))
        model.zero_grad()
        return value

    before = kd()
    report = recover(model, train, method="full", tokens=10 * 4 * SEQLEN, batch_size=4, lr=1e-2, loss="kd",
                     teacher=teacher, masks=sparse_masks(model), progress=False)
    assert before > 0.1 and report.loss == "kd" and kd() < 0.7 * before
    with pytest.raises(MetricGPError, match="top-k"):
        recover(model, train, tokens=SEQLEN, loss="kd", progress=False)
    with pytest.raises(MetricGPError, match="other windows"):
        recover(model, windows(4, seed=3), tokens=SEQLEN, loss="ce+kd", teacher=teacher, progress=False)


def test_schedules():
    assert [lr_factor("constant", s, 10, 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [lr_factor("cosine", s, 10, 0) for s in range(10)]
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:], strict=False)) and cosine[-1] > 0
    assert lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_checkpoints_make_a_curve_and_call_back():
    model, seen = pruned(Unstructured(0.5)), []
    report = recover(model, windows(), method="lora", tokens=6 * SEQLEN, lr=1e-3, val_windows=windows(2, seed=5),
                     checkpoints=(2 * SEQLEN, 3 * SEQLEN + 5, 100 * SEQLEN), schedule="cosine", warmup=0.5,
                     on_checkpoint=lambda tokens, m, point: seen.append((tokens, m.training, point["val_ppl"])),
                     masks=sparse_masks(model), progress=False)
    assert [p["tokens"] for p in report.curve] == [2 * SEQLEN, 3 * SEQLEN, 6 * SEQLEN]  # whole steps, capped
    assert [t for t, _, _ in seen] == [2 * SEQLEN, 3 * SEQLEN, 6 * SEQLEN] and not any(train for _, train, _ in seen)
    assert all(math.isfinite(p["val_ppl"]) and p["train_loss"] > 0 for p in report.curve)
    assert report.warmup_steps == 3 and report.schedule == "cosine" and len(report.losses) == 6
    assert report.curve[-1]["val_ppl"] == pytest.approx(report.val_ppl_after, rel=1e-4)  # what was trained is merged


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(method, tmp_path):
    options = dict(method=method, tokens=8 * 2 * SEQLEN, batch_size=2, lr=1e-2, checkpoints=(4 * SEQLEN, 8 * SEQLEN,
                   12 * SEQLEN), val_windows=windows(2, seed=5), warmup=0.25, progress=False)
    whole = pruned(NM(2, 4))
    expected = recover(whole, windows(), masks=sparse_masks(whole), **options)

    def kill_at_second(tokens, _model, _point):
        if tokens == 8 * SEQLEN:
            raise Killed

    state, killed = tmp_path / "state.pt", pruned(NM(2, 4))
    with pytest.raises(Killed):
        recover(killed, windows(), masks=sparse_masks(killed), state_path=state, on_checkpoint=kill_at_second,
                **options)
    assert state.is_file()
    resumed_model = pruned(NM(2, 4))
    resumed = recover(resumed_model, windows(), masks=sparse_masks(resumed_model), state_path=state, **options)
    assert resumed.resumed_from_step == 2
    untimed = lambda curve: [{k: v for k, v in p.items() if k != "train_seconds"} for p in curve]  # noqa: E731
    assert resumed.losses == expected.losses and untimed(resumed.curve) == untimed(expected.curve)
    assert resumed.val_ppl_before == expected.val_ppl_before and resumed.val_ppl_after == expected.val_ppl_after
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed_model.state_dict().items())
    with pytest.raises(MetricGPError, match="another recovery run"):
        recover(pruned(NM(2, 4)), windows(), state_path=state, **{**options, "lr": 1e-3})


def test_training_windows_refuse_a_test_split():
    with pytest.raises(MetricGPError, match="reserved for reports"):
        training_windows("wikitext2:test", None, SEQLEN, 64, 0)


@pytest.mark.parametrize("kwargs,message", [
    ({"loss": "mse"}, "unknown recovery loss"),
    ({"schedule": "linear"}, "unknown lr schedule"),
    ({"warmup": 1.0}, "warmup"),
])
def test_bad_options_are_user_errors(kwargs, message):
    with pytest.raises(MetricGPError, match=message):
        recover(tiny_model("llama"), windows(), tokens=SEQLEN, progress=False, **kwargs)
