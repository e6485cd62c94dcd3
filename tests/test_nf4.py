"""NF4 / FP4 block-wise quantization, double quantization and the chunked codebook kernel."""

from __future__ import annotations

import pytest
import torch

from effinfer.compress.quant.nf4 import quantize_model_nf4
from effinfer.kernels import codebook_linear, quant_linear
from effinfer.quant import codebook
from tests.conftest import cpu_kernel_missing
from tests.quant_helpers import CODEBOOK_KERNEL_CASES

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type's 16 values.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def nearest_reference(w: torch.Tensor, levels: torch.Tensor, blocksize: int):
    """Brute force: per block of the flattened weight, absmax and argmin |x / absmax - level|."""
    flat = w.reshape(-1).double()
    codes, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start : start + blocksize]
        m = block.abs().max()
        absmax.append(m)
        codes.append((block[:, None] / m - levels.double()[None, :]).abs().argmin(dim=1))
    return torch.cat(codes), torch.stack(absmax)


def test_nf4_levels_are_the_published_ones():
    assert torch.equal(codebook.nf4_levels(), torch.tensor(PUBLISHED_NF4, dtype=torch.float32))


def test_fp4_levels_are_e2m1_magnitudes_scaled_to_one():
    levels = codebook.fp4_levels()
    expected = sorted(
        {v / 12 for v in (0, 0.0625, 2, 3, 4, 6, 8, 12)} | {-v / 12 for v in (0.0625, 2, 3, 4, 6, 8, 12)}
    )
    assert sorted(set(levels.tolist())) == pytest.approx(expected)
    assert torch.equal(levels[8:], -levels[:8])  # the top bit is the sign


def test_round_trip_of_a_known_tensor():
    # Block 0: exact levels times 3 (absmax 3 is present) -> exact. Block 1: values between levels.
    levels = codebook.nf4_levels()
    exact = torch.cat([levels, levels.flip(0), levels, levels]) * 3.0
    between = torch.linspace(-2.0, 2.0, 64)
    w = torch.cat([exact, between]).view(4, 32)
    q = codebook.quantize_codebook(w, "nf4", blocksize=64)
    assert torch.equal(q.dequantize()[:2], exact.view(2, 32))
    assert torch.equal(
        q.codes.reshape(-1)[:64],
        torch.cat([torch.arange(16), torch.arange(15, -1, -1)] + [torch.arange(16)] * 2).to(torch.uint8),
    )
    assert q.absmax.tolist() == [3.0, 2.0]
    codes = q.codes.reshape(-1)[64:].long()
    assert torch.equal(q.dequantize().reshape(-1)[64:], levels[codes] * 2.0)
    assert (q.dequantize().reshape(-1)[64:] - between).abs().max() <= 2.0 * (levels.diff().max() / 2) + 1e-6


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_are_the_nearest_level_per_flattened_block(quant_type):
    torch.manual_seed(0)
    w = torch.randn(13, 75)  # 975 values: blocks cross rows and the last one is short
    q = codebook.quantize_codebook(w, quant_type, blocksize=64)
    codes, absmax = nearest_reference(w, q.code, 64)
    assert torch.equal(q.absmax, absmax.float())
    # FP4 has +0 and -0: compare the levels the codes stand for, not the codes.
    assert torch.equal(q.code[q.codes.reshape(-1).long()], q.code[codes])


def test_double_quant_bits_per_parameter():
    torch.manual_seed(0)
    w = torch.randn(256, 4096) * 0.02
    plain = codebook.quantize_codebook(w, "nf4", 64, double_quant=False)
    double = codebook.quantize_codebook(w, "nf4", 64, double_quant=True)
    assert plain.nbytes() * 8 / w.numel() == pytest.approx(4.5)
    assert double.nbytes() * 8 / w.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert round(double.nbytes() * 8 / w.numel(), 3) == 4.127
    # The 8-bit absmax is close to the float one and the weights barely change.
    assert torch.allclose(double.absmax, plain.absmax, rtol=0.02)
    assert (double.dequantize() - plain.dequantize()).abs().max() < 0.02 * w.abs().max()


def test_rows_and_cat_rows_keep_the_weight_and_its_nested_state():
    torch.manual_seed(1)
    parts = [
        codebook.quantize_codebook(torch.randn(r, 128), "nf4", 64, double_quant=True) for r in (256, 128, 128)
    ]
    fused = codebook.CodebookWeight.cat_rows(parts)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert fused.nbytes() == sum(p.nbytes() for p in parts)
    back = fused.rows(256, 384)
    assert torch.equal(back.codes, parts[1].codes) and torch.equal(back.absmax, parts[1].absmax)
    assert len(back.nested) == 1 and torch.equal(back.nested[0].codes, parts[1].nested[0].codes)
    with pytest.raises(ValueError, match="block boundaries"):
        codebook.quantize_codebook(torch.randn(4, 48), "nf4", 64).rows(1, 3)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_matches_bitsandbytes_bit_for_bit(quant_type, double_quant):
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(2)
    w = torch.randn(37, 150) * 0.05
    packed, state = functional.quantize_4bit(
        w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    ours = codebook.quantize_codebook(w, quant_type, 64, double_quant)
    flat = packed.reshape(-1)
    their_codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: w.numel()]
    assert torch.equal(ours.codes.reshape(-1), their_codes)
    assert torch.equal(ours.dequantize(), functional.dequantize_4bit(packed, state))
    assert torch.equal(ours.code, state.code)
    if double_quant:
        assert torch.equal(ours.nested[0].codes, state.absmax)
        assert torch.equal(ours.nested[0].nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested[0].code, state.state2.code)


@pytest.mark.parametrize("shape", [(37, 150), (5, 64), (130, 96), (64, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantize_reference(shape, dtype, monkeypatch):
    torch.manual_seed(3)
    out_features, in_features = shape
    weight = codebook.quantize_codebook(torch.randn(shape) * 0.1, "nf4", 64, double_quant=True)
    bias = torch.randn(out_features)
    x = torch.randn(3, in_features).to(dtype)
    expected = weight.reference_linear(x, bias)
    for chunk in (codebook_linear.CHUNK_VALUES, 300):  # one chunk, and many chunks with blocks across rows
        monkeypatch.setattr(codebook_linear, "CHUNK_VALUES", chunk)
        data = codebook_linear.prepare(weight, bias, dtype)
        if chunk == 300:
            assert data.chunk_rows < out_features or out_features <= 5
        y = codebook_linear.apply(data, x)
        assert y.dtype == dtype and y.shape == (3, out_features)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert torch.allclose(y.float(), expected.float(), atol=tol, rtol=tol)


def test_quantize_model_nf4_quantizes_each_checkpoint_tensor(tmp_path):
    from effinfer.config import ModelConfig
    from effinfer.loading.safetensors import load_model
    from tests.conftest import make_hf_model

    _, path = make_hf_model("LlamaForCausalLM", tmp_path / "m")
    model = load_model(path, ModelConfig.from_dir(path), torch.float32, torch.device("cpu"), 64, False, False)
    qkv = model.model.layers[0].self_attn.qkv_proj
    before = qkv.weight.data.clone()
    quantize_model_nf4(model, "fp4", 64, double_quant=True)
    assert qkv.quantized.quant_type == "fp4" and len(qkv.quantized.nested) == 3
    q_rows = qkv.shard_sizes[0]
    expected = codebook.quantize_codebook(before[:q_rows], "fp4", 64, True).dequantize()
    assert torch.equal(qkv.quantized.dequantize()[:q_rows], expected)
    with pytest.raises(ValueError, match="unknown 4-bit type"):
        quantize_model_nf4(model, "int4")


def test_row_blocks_only_when_blocks_tile_rows():
    weight = codebook.quantize_codebook(torch.randn(6, 128), "nf4", 64)
    grouped = codebook.row_blocks(weight)
    assert grouped.group_size == 64 and grouped.scales.shape == (6, 2)
    # Row r's second block is flattened block 2r + 1.
    assert torch.equal(grouped.scales[:, 1], weight.absmax[1::2])
    assert torch.equal(grouped.qweight, weight.codes) and not grouped.zeros.any()
    assert codebook.row_blocks(codebook.quantize_codebook(torch.randn(6, 96), "nf4", 64)) is None


def _bf16_levels(weight: codebook.CodebookWeight) -> codebook.CodebookWeight:
    """The same weight with its levels rounded to bf16, as the table kernels hold them."""
    code = weight.code.to(torch.bfloat16).float()
    return codebook.CodebookWeight(weight.codes, weight.absmax, code, weight.quant_type, weight.blocksize)


@pytest.mark.parametrize("case", CODEBOOK_KERNEL_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("path", ["avx512", "amx"])
def test_cpu_table_kernel_matches_reference(case, path, monkeypatch):
    from effinfer.kernels.cpu import woq

    if cpu_kernel_missing(woq.extension):
        pytest.skip("CPU weight-only kernel unavailable here")
    out_features, in_features, blocksize, quant_type = case
    monkeypatch.setitem(woq.AMX_MIN_ROWS, "table", 10**9 if path == "avx512" else 1)
    torch.manual_seed(out_features + in_features)
    weight = codebook.quantize_codebook(
        torch.randn(out_features, in_features) * 0.05, quant_type, blocksize, True
    )
    bias = torch.randn(out_features)
    state = quant_linear.prepare(weight, bias, None, torch.bfloat16)
    assert state.backend == "cpu-woq"
    for rows in (1, 2, 3, 5, 17, 70):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, in_features).to(dtype)
            y = quant_linear.apply(state, x)
            assert y.dtype == dtype and y.shape == (rows, out_features)
            true = weight.reference_linear(x.float(), bias)
            if dtype == torch.float32:  # levels and x both split into two bf16 terms: fp32-accurate
                assert (y - true).abs().max() <= 1e-4 * true.abs().max()
                continue
            # bf16: against the kernel's own (bf16-rounded) levels, only the output's rounding;
            # against the true levels, each level's rounding (up to 2**-8) on top.
            exact = (_bf16_levels(weight)).reference_linear(x.float(), bias)
            assert (y.float() - exact).abs().max() <= 8e-3 * exact.abs().max()
            assert (y.float() - true).abs().max() <= 2e-2 * true.abs().max()


def test_without_the_cpu_kernel_nf4_runs_the_chunked_decode(monkeypatch):
    """Where the C++ kernel is unavailable (no AMX, no compiler), tiling blocks still run, exactly."""
    from effinfer.kernels.cpu import woq

    monkeypatch.setattr(woq, "extension", lambda: None)
    weight = codebook.quantize_codebook(torch.randn(40, 128) * 0.05, "nf4", 64, double_quant=True)
    bias = torch.randn(40)
    state = quant_linear.prepare(weight, bias, None, torch.float32)
    assert state.backend == "codebook"
    x = torch.randn(3, 128)
    expected = weight.reference_linear(x, bias)
    assert torch.allclose(quant_linear.apply(state, x), expected, atol=1e-5, rtol=1e-5)


def test_blocks_across_rows_fall_back_to_the_chunked_decode():
    weight = codebook.quantize_codebook(torch.randn(10, 96), "nf4", 64)
    state = quant_linear.prepare(weight, None, None, torch.bfloat16)
    assert state.backend == "codebook"
    x = torch.randn(2, 96)
    y = quant_linear.apply(state, x.to(torch.bfloat16))
    expected = weight.reference_linear(x, None)
    assert (y.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
