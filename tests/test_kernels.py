"""Every fast kernel path against its pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from effinfer.kernels import dense_linear
from effinfer.layers.linear import Linear

requires_prepack = pytest.mark.skipif(
    not dense_linear.can_prepack(torch.empty(1, dtype=torch.bfloat16)), reason="no oneDNN bf16 on this CPU"
)


@requires_prepack
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 200])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (257, 130), (1000, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_bf16_linear_matches_reference(rows, out_features, in_features, bias):
    torch.manual_seed(rows * 7 + out_features)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    b = torch.randn(out_features, dtype=torch.bfloat16) if bias else None
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    state = dense_linear.prepare(weight, b)
    assert state.packed
    ours = dense_linear.apply(state, x).float()
    # The reference in float32 from the same bf16 inputs; both round the output to bf16 once.
    expected = dense_linear.reference(x.float(), weight.float(), None if b is None else b.float())
    scale = expected.abs().max()
    assert (ours - expected).abs().max() <= 1e-2 * scale


@requires_prepack
def test_linear_layer_releases_its_copy_and_keeps_working():
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
