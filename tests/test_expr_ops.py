"""Protected operators stay finite on hostile input; compiled built-ins match hand-written formulas."""

from __future__ import annotations

import pytest
import torch

from metricgp.expr import OPERATORS, compile_metric, parse, resolve_metric

SHAPE = (4, 6)


def _hostile_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "zeros": torch.zeros(SHAPE),
        "negatives": -torch.rand(SHAPE, generator=g) * 10,
        "huge": torch.tensor([1e30, -1e30, 3e38, -3e38, 1.0, 0.0]).repeat(4, 1),
        "tiny": torch.tensor([1e-38, -1e-38, 1e-45, -1e-12, 1e-9, 0.0]).repeat(4, 1),
        "constant": torch.full(SHAPE, 7.0),
        "randn": torch.randn(SHAPE, generator=g),
    }


@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("kind", sorted(_hostile_inputs()))
def test_operator_is_finite_and_keeps_shape(name, kind):
    inputs = _hostile_inputs()
    x = inputs[kind]
    op = OPERATORS[name]
    if op.arity == 1:
        outs = [op.fn(x)]
    else:  # pair with every input kind, both orders, including a (1, in) row to broadcast
        others = [*inputs.values(), inputs["randn"][:1]]
        outs = [op.fn(x, y) for y in others] + [op.fn(y, x) for y in others]
    for out in outs:
        assert out.shape == SHAPE
        assert torch.isfinite(out).all(), (name, kind, out)


@pytest.mark.parametrize("name", ["mms", "zsn"])
def test_normalisers_of_a_constant_are_zero(name):
    assert torch.equal(OPERATORS[name].fn(torch.full(SHAPE, 3.5)), torch.zeros(SHAPE))


def _stats(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W": torch.randn(8, 12, generator=g),
        "X": torch.rand(1, 12, generator=g),
        "G": torch.rand(8, 12, generator=g),
    }


def test_compiled_builtins_match_hand_written():
    s = _stats()
    w, x, g = s["W"], s["X"], s["G"]
    expected = {
        "magnitude": w.abs(),
        "wanda": w.abs() * x.sqrt(),
        "gblm": w.abs() * (x.sqrt() + 100.0 * g),
        "pruner-zero": (w * w).abs() * (g - g.min()) / (g.max() - g.min()),
        "ria": (w.abs() / w.abs().sum(1, keepdim=True) + w.abs() / w.abs().sum(0, keepdim=True))
        * x.sqrt().sqrt(),
    }
    for name, want in expected.items():
        got = compile_metric(resolve_metric(name))(s)
        assert got.shape == w.shape and got.dtype == torch.float32, name
        torch.testing.assert_close(got, want.expand_as(w), rtol=1e-5, atol=1e-7, msg=name)


def test_compile_semantics():
    s = _stats(1)
    # a constant metric is broadcast to W's shape
    out = compile_metric(parse("2.5"))(s)
    assert out.shape == s["W"].shape and torch.all(out == 2.5)
    # leaves are read as float32 whatever their dtype
    s64 = {k: v.double() for k, v in s.items()}
    assert compile_metric(parse("W * X"))(s64).dtype == torch.float32
    # whole-tensor operators see X broadcast to W's shape: colnorm(X) is X / (rows * X)
    torch.testing.assert_close(compile_metric(parse("colnorm(X)"))(s), torch.full((8, 12), 1 / 8))
    # compiled closures are cached by formula
    assert compile_metric(parse("W * X")) is compile_metric(parse("mul(W, X)"))
    # protected division by zero stays finite
    z = dict(s, W=torch.zeros(8, 12))
    assert torch.isfinite(compile_metric(parse("X / W + log(W) + exp(1000.0 * X)"))(z)).all()
