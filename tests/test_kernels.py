"""Every fast kernel path against its pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from effinfer.kernels import dense_linear
from effinfer.kernels.cpu import skinny
from effinfer.layers.linear import Linear
from tests.conftest import cpu_kernel_missing

requires_prepack = pytest.mark.skipif(
    not dense_linear.can_prepack(torch.empty(1, dtype=torch.bfloat16)), reason="no oneDNN bf16 on this CPU"
)
requires_skinny = pytest.mark.skipif(
    cpu_kernel_missing(skinny.extension), reason="no AMX skinny-GEMM kernel here"
)


@requires_prepack
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 200])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (257, 130), (1000, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_bf16_linear_matches_reference(rows, out_features, in_features, bias):
    x, weight, b = random_problem(rows, out_features, in_features, bias, seed=rows * 7 + out_features)
    state = dense_linear.prepare(weight, b, allow_skinny=False)
    assert state.packed
    assert_matches_reference(state, x, weight, b)


def random_problem(rows, out_features, in_features, bias, seed):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    b = torch.randn(out_features, dtype=torch.bfloat16) if bias else None
    return torch.randn(rows, in_features, dtype=torch.bfloat16), weight, b


def assert_matches_reference(state, x, weight, b):
    """The reference in float32 from the same bf16 inputs; both round the output to bf16 once."""
    ours = dense_linear.apply(state, x).float()
    expected = dense_linear.reference(x.float(), weight.float(), None if b is None else b.float())
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-2 * expected.abs().max()


@requires_skinny
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 33, 64, 65, 200])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (250, 160), (1000, 512), (7, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_bf16_linear_matches_reference(rows, out_features, in_features, bias):
    """Up to 64 rows take the AMX kernel (out_features not a multiple of 16 too), more take F.linear."""
    x, weight, b = random_problem(rows, out_features, in_features, bias, seed=rows * 5 + out_features)
    state = dense_linear.prepare(weight, b)
    assert state.skinny and not state.packed and state.weight.data_ptr() == weight.data_ptr()  # no copy
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(skinny, "linear", lambda *args: calls.append(1) or skinny_linear(*args))
        assert_matches_reference(state, x, weight, b)
    assert len(calls) == (1 if rows <= skinny.MAX_ROWS else 0)  # the kernel up to 64 rows, F.linear above
    # Leading dimensions and a non-contiguous x work as well.
    wide = torch.randn(2, rows, in_features + 32, dtype=torch.bfloat16)[..., 16 : 16 + in_features]
    assert_matches_reference(state, wide, weight, b)


skinny_linear = skinny.linear


def test_skinny_kernel_skips_what_it_cannot_take(monkeypatch):
    assert not skinny.supports(torch.empty(8, 40, dtype=torch.bfloat16))  # in_features not a multiple of 32
    assert not skinny.supports(torch.empty(8, 64))  # float32
    assert not skinny.supports(torch.empty(64, 8, dtype=torch.bfloat16).t())  # not contiguous
    if skinny.supports(torch.empty(16, 64, dtype=torch.bfloat16)):
        state = dense_linear.prepare(torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True), None)
        x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
        assert dense_linear.apply(state, x).grad_fn is not None  # autograd on: F.linear, not the kernel
    monkeypatch.setattr(skinny, "extension", lambda: None)
    assert not skinny.supports(torch.empty(8, 64, dtype=torch.bfloat16))


@requires_skinny
def test_skinny_kernel_rejects_bad_shapes_clearly():
    weight = torch.randn(16, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="1-64 rows"):
        skinny.linear(torch.randn(65, 64, dtype=torch.bfloat16), weight, None)
    with pytest.raises(RuntimeError, match="bf16 CPU tensors"):
        skinny.linear(torch.randn(2, 64), weight, None)


@requires_prepack
def test_linear_layer_releases_its_copy_and_keeps_working(monkeypatch):
    monkeypatch.setattr(skinny, "extension", lambda: None)  # the oneDNN path makes its own copy
    layer = Linear(64, [32, 16], bias=True).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    layer.finalize()
    assert layer.weight.numel() == 0 and layer.num_parameters() == 48 * 64 + 48
    assert (layer(x).float() - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_float32_is_not_prepacked():
    state = dense_linear.prepare(torch.randn(8, 8), None)
    assert not state.packed
