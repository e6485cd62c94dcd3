"""CPU weight-only int8 / int4 kernels (kernels/cpu/woq.py) against ``reference_linear``.

Every path (register-blocked AVX512-BF16 for few rows, AMX tiles for more) is forced in turn and
held to the dequantize-then-fp32-matmul reference, over bit widths, group layouts (per channel,
group-wise, a width the group size does not divide, GPTQ act-order), zero points, bias and
activation dtypes. Where the kernel cannot be built or run, the fallback is tested instead.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from effinfer.kernels.cpu import build, woq
from effinfer.layers.linear import Linear
from effinfer.quant.integer import QuantizedWeight
from tests.conftest import cpu_kernel_missing
from tests.quant_helpers import quantized

requires_kernel = pytest.mark.skipif(
    cpu_kernel_missing(woq.extension), reason="CPU int8/int4 kernel unavailable here"
)

# (out_features, in_features, group_size, act_order): per channel, the usual groups, a last group
# shorter than the rest (172 = 5 * 32 + 12), odd widths, and act-order permutations.
LAYOUTS = [
    (64, 256, None, False),
    (37, 172, 32, False),
    (48, 200, 64, False),
    (33, 75, None, False),
    (40, 384, 128, False),
    (29, 256, 64, True),
    (37, 172, 32, True),
]
# Forced paths (AMX from this many rows, int8-activation VNNI up to this many: never taken by these
# weight-only schemes, see test_weight_only_schemes_keep_bf16_activations) and the row counts that
# exercise their blocking (remainders included).
# "panel": panels of the weight dequantized to bf16 once per call into an L2 buffer, then a blocked AMX GEMM
# (prefill-sized batches).
PATHS = {
    "avx512": (10**9, 0, [1, 2, 3, 4, 7]),
    "amx": (1, 0, [1, 5, 17, 33, 70]),
    "panel": (1, 0, [1, 5, 33, 70]),
}


def int8_activations(x: torch.Tensor, data: woq.WoqData) -> torch.Tensor:
    """x as the VNNI path multiplies it: in the kernel's column order (act-order gather, padding),
    each 32 columns rounded to int8 steps of max|x| / 127, then back in the original order."""
    k = data.in_features
    index = data.col_index if data.col_index is not None else torch.arange(data.padded_in).clamp(max=k)
    cols = F.pad(x.float().reshape(-1, k), (0, 1))[:, index]
    blocks = cols.reshape(cols.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    steps = torch.where(amax > 0, torch.round(blocks * (127 / amax)), torch.zeros(()))
    rounded = (steps * (amax / 127)).reshape(cols.shape)
    back = torch.zeros(cols.shape[0], k + 1)
    back[:, index] = rounded  # padding lands in the extra column k
    return back[:, :k].reshape(x.shape)


def uses_int8_activations(data: woq.WoqData, x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.numel() // x.shape[-1] <= woq._vnni_max_rows(data)


def assert_close_to_reference(
    y: torch.Tensor, x: torch.Tensor, qw: QuantizedWeight, bias, data: woq.WoqData | None = None
) -> None:
    """``y`` against the dequantized weight times x; where ``data`` says the VNNI path ran, times x
    rounded to int8 as that path rounds it (then only fp32 sums and the bf16 output differ)."""
    # bf16 output is rounded once (2**-9 relative); float32 goes through a two-term bf16 split of x.
    tol = 8e-3 if x.dtype == torch.bfloat16 else 1e-4
    if data is not None and uses_int8_activations(data, x):
        x = int8_activations(x, data)
    expected = qw.reference_linear(x.float(), bias)
    err = (y.float() - expected).abs().max()
    assert err <= tol * expected.abs().max(), f"max error {err:.3g} vs scale {expected.abs().max():.3g}"


@requires_kernel
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_matches_reference(path, bits, layout, symmetric, monkeypatch):
    n, k, group, act_order = layout
    min_rows, vnni_rows, row_counts = PATHS[path]
    monkeypatch.setitem(woq.AMX_MIN_ROWS, bits, min_rows)
    monkeypatch.setitem(woq.VNNI_MAX_ROWS, bits, vnni_rows)
    monkeypatch.setattr(woq, "PANEL_MIN_ROWS", 1 if path == "panel" else 10**9)
    qw = quantized(n, k, bits, group, symmetric, act_order, seed=n + k + bits)
    assert qw.has_act_order() == act_order
    bias = torch.randn(n) if symmetric else None
    data = woq.prepare(qw, bias, torch.bfloat16)
    assert data is not None
    for rows in row_counts:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, k).to(dtype)
            y = woq.apply(data, x)
            assert y.dtype == dtype and y.shape == (rows, n)
            assert_close_to_reference(y, x, qw, bias, data)


@requires_kernel
def test_weight_only_schemes_keep_bf16_activations():
    """W4A16 / W8A16 stay what they say: the int8-activation decode path is for GGUF blocks only."""
    for bits in (4, 8):
        data = woq.prepare(quantized(64, 256, bits, 32, False, False, seed=bits), None, torch.bfloat16)
        assert not data.int8_activations and woq._vnni_max_rows(data) == 0


@requires_kernel
def test_leading_dimensions_and_large_values():
    qw = quantized(50, 128, 8, 32, False, False, seed=1)
    data = woq.prepare(qw, None, torch.bfloat16)
    x = (torch.randn(2, 3, 128) * 100).to(torch.bfloat16)
    y = woq.apply(data, x)
    assert y.shape == (2, 3, 50)
    assert_close_to_reference(y.reshape(6, 50), x.reshape(6, 128), qw, None, data)


def test_column_layout_groups_act_order_columns_contiguously():
    qw = quantized(4, 70, 4, 32, True, True, seed=3)
    col_index, chunks = woq.column_layout(qw)
    groups = qw.group_index()
    # Three groups (32, 32, 6 columns), each padded to one 32-column chunk.
    assert chunks.tolist() == [0, 1, 2, 3] and col_index.numel() == 96
    for g in range(3):
        cols = col_index[g * 32 : (g + 1) * 32]
        real = cols[cols < 70]
        assert sorted(real.tolist()) == sorted(torch.nonzero(groups == g).flatten().tolist())
        assert bool((cols[len(real) :] == 70).all())  # padding points at the zero column


@requires_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_layer_uses_the_kernel(bits):
    torch.manual_seed(bits)
    layer = Linear(96, [40, 24], bias=True).to(torch.bfloat16)
    torch.nn.init.normal_(layer.bias)
    qw = quantized(64, 96, bits, 32, False, False, seed=bits)
    layer.set_quantized(qw)
    layer.finalize()
    assert layer._kernel_state.backend == "cpu-woq"
    for rows in (1, 9):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        assert_close_to_reference(layer(x), x, qw, layer.bias.float())


def test_fallback_runs_dequantized_when_the_kernel_is_unavailable(monkeypatch):
    monkeypatch.setattr(woq, "extension", lambda: None)
    layer = Linear(96, 64, bias=False)
    qw = quantized(64, 96, 4, 32, False, True, seed=5)
    layer.set_quantized(qw)
    layer.finalize()
    assert layer._kernel_state.backend == "dequantized"
    x = torch.randn(3, 96)
    assert_close_to_reference(layer(x), x, qw, None)


def test_a_failed_build_warns_and_returns_none(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken_build(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cpp_extension, "load", broken_build)
    monkeypatch.setattr(build, "cpu_flags", lambda: set(woq.REQUIRED_CPU_FLAGS))
    monkeypatch.delenv("EFFINFER_CPU_WOQ", raising=False)
    monkeypatch.delenv("EFFINFER_REQUIRE_KERNELS", raising=False)  # the fallback, not CI's raise
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert woq.extension.__wrapped__() is None
    assert "compiler exploded" in caplog.text
