"""LLM.int8(): row-wise int8 weights, per-token int8 activations, float outlier columns.

The kernel is held to its fp32 reference, and both ends of the threshold to independent
definitions: threshold inf is plain per-token W8A8 (``reference_linear`` with
``act_quant="int8"``), threshold 0 is the float product with the dequantized weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effinfer.compress.quant import llm_int8 as llm_int8_quant
from effinfer.kernels import llm_int8
from effinfer.layers.linear import Linear, quantizable_linears
from effinfer.quant.integer import QuantizedWeight, quantize_rtn
from effinfer.quant.llm_int8 import LLMInt8Weight, quantize_llm_int8


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # Same quantized operands on both sides; only the fp32 summation order differs, plus one
    # rounding to the output dtype.
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    atol = 1e-4 * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _layer(out_features=96, in_features=128, seed=0, threshold=6.0):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features) * torch.rand(out_features, 1)  # rows of different ranges
    return weight, torch.randn(out_features), quantize_llm_int8(weight, threshold)


def _activations(rows, in_features=128, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(rows, in_features)  # |x| < 6 but for the two planted outliers
    x[:, 7] *= 30  # an outlier channel in every token
    x[rows // 2, 90] = -9.0  # and one that only a single token has
    return x.to(dtype)


def _as_w8a8_weight(w: LLMInt8Weight) -> QuantizedWeight:
    """The documented QuantizedWeight layout of symmetric int8: code + 128, scale = absmax / 127."""
    qweight = (w.weight.to(torch.int32) + 128).to(torch.uint8)
    scales = (w.absmax / 127).reshape(-1, 1)
    return QuantizedWeight(qweight, scales, torch.full_like(scales, 128, dtype=torch.int32), 8, w.in_features)


def test_weight_codes_are_rowwise_absmax_int8():
    weight, _, qw = _layer()
    assert qw.weight.dtype == torch.int8 and qw.weight.abs().max() == 127
    torch.testing.assert_close(qw.absmax, weight.abs().amax(dim=1))
    # Round to nearest on the grid absmax/127: the same codes as symmetric per-channel RTN (up to a
    # float tie), and at most half a step from the float weight.
    rtn = quantize_rtn(weight, 8, None, True)
    assert (qw.weight.int() - (rtn.qweight.int() - 128)).abs().max() <= 1
    step = (qw.absmax / 127)[:, None]
    assert ((qw.dequantize() - weight).abs() <= step / 2 + 1e-6).all()
    parts = [qw.rows(0, 40), qw.rows(40, 96)]
    fused = LLMInt8Weight.cat_rows(parts)
    assert torch.equal(fused.weight, qw.weight) and torch.equal(fused.absmax, qw.absmax)
    with pytest.raises(ValueError):
        LLMInt8Weight(qw.weight.to(torch.int16), qw.absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_kernel_matches_reference(dtype, rows):
    _, bias, qw = _layer()
    state = llm_int8.prepare(qw, bias, dtype)
    x = _activations(rows, dtype=dtype)
    y = llm_int8.apply(state, x)
    assert y.dtype == dtype and y.shape == (rows, 96)
    _close(y, qw.reference_linear(x, bias), dtype)
    y3 = llm_int8.apply(state, x.reshape(1, rows, 128))
    assert y3.shape == (1, rows, 96)
    torch.testing.assert_close(y3[0], y)


@pytest.mark.parametrize("rows", [1, 6])
def test_infinite_threshold_is_plain_per_token_w8a8(rows):
    _, bias, qw = _layer(threshold=float("inf"))
    x = _activations(rows)
    expected = _as_w8a8_weight(qw).reference_linear(x, bias, "int8")
    _close(qw.reference_linear(x, bias), expected, torch.float32)
    state = llm_int8.prepare(qw, bias, torch.float32)
    _close(llm_int8.apply(state, x), expected, torch.float32)
    assert state.outlier_columns == 0 and state.total_columns == 128


def test_zero_threshold_is_the_float_product_with_the_dequantized_weight():
    _, bias, qw = _layer(threshold=0.0)
    x = _activations(6)
    expected = F.linear(x, qw.dequantize(torch.float32), bias)
    torch.testing.assert_close(qw.reference_linear(x, bias), expected, rtol=1e-5, atol=1e-5)
    state = llm_int8.prepare(qw, bias, torch.float32)
    torch.testing.assert_close(llm_int8.apply(state, x), expected, rtol=1e-5, atol=1e-5)
    assert state.outlier_columns == 128


def test_decomposition_removes_what_an_outlier_column_costs():
    _, bias, qw = _layer()
    x = _activations(16)
    exact = F.linear(x, qw.dequantize(), bias)  # measures what quantizing the activations adds

    def error(threshold):
        qw.threshold = threshold
        return ((qw.reference_linear(x, bias) - exact).norm() / exact.norm()).item()

    # One column 30x the others flattens every token's int8 scale; taking it out fixes that.
    assert error(6.0) < 0.25 * error(float("inf")), (error(6.0), error(float("inf")))


def test_outlier_columns_are_counted_per_call():
    _, bias, qw = _layer()
    state = llm_int8.prepare(qw, bias, torch.float32)
    x = torch.full((4, 128), 0.5)
    x[0, 3], x[2, 3], x[1, 100] = 7.0, -8.0, 6.5  # columns 3 and 100 exceed 6.0
    x[3, 50] = 6.0  # not above the threshold
    llm_int8.apply(state, x)
    assert (state.outlier_columns, state.total_columns) == (2, 128)
    llm_int8.apply(state, torch.ones(2, 128))
    assert (state.outlier_columns, state.total_columns) == (2, 256)
    assert torch.equal(llm_int8.outlier_columns(x, 6.0), torch.tensor([3, 100]))


# ---- against bitsandbytes' own LLM.int8() ------------------------------------------------------

FP16_UNIT_ROUNDOFF = 2.0**-11


def _bnb_linear(weight: torch.Tensor, bias: torch.Tensor, threshold: float = 6.0):
    """bitsandbytes' inference layer (``has_fp16_weights=False``): it quantizes the weight itself."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(
        weight.shape[1], weight.shape[0], bias=True, has_fp16_weights=False, threshold=threshold
    )
    layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(bias.half(), requires_grad=False)
    return layer.to("cpu").eval()


def _fp16_layer_and_activations(rows: int, seed: int = 0):
    """fp16-exact weights and inputs (bitsandbytes computes in fp16), two outlier columns."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(96, 128, generator=g) * torch.rand(96, 1, generator=g)).half().float()
    bias = torch.randn(96, generator=g).half().float()
    x = torch.randn(rows, 128, generator=g).clamp(-4, 4)
    x[:, 7] = 8 + 20 * torch.rand(rows, generator=g)  # above 6 in every token
    x[:, 90] = -(7 + torch.rand(rows, generator=g))
    return weight, bias, x.half().float()


def _magnitude(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sum_k |x_k||w_nk| + |b_n|: what every rounding error of the product is proportional to."""
    return x.abs() @ w.abs().t() + bias.abs()


@pytest.mark.parametrize("rows", [1, 6])
def test_matches_bitsandbytes_linear8bitlt(rows):
    """Same weights, same inputs: bitsandbytes' Linear8bitLt and effinfer's kernel agree to fp16 rounding.

    Both quantize the weight row-wise (absmax / 127) and the non-outlier inputs per token, multiply
    in int8 and add the outlier columns in float. With every outlier column above the threshold in
    every token the int8 operands are the same, so what separates the results is bitsandbytes'
    fp16: its integer part rounded to fp16, the dequantized outlier weights (each within 2^-11),
    and the output rounded once more: at most 3 * 2^-11 * sum |x||w| + |b|.
    """
    weight, bias, x = _fp16_layer_and_activations(rows)
    bnb_layer = _bnb_linear(weight, bias)
    with torch.no_grad():
        theirs = bnb_layer(x.half()).float()
    qw = quantize_llm_int8(weight, 6.0)
    assert torch.equal(bnb_layer.weight.data, qw.weight)  # the same int8 codes ...
    assert torch.equal(bnb_layer.state.SCB, qw.absmax)  # ... and row absmax
    ours = llm_int8.apply(llm_int8.prepare(qw, bias, torch.float32), x)
    bound = 3 * FP16_UNIT_ROUNDOFF * _magnitude(x, qw.dequantize(), bias)
    assert ((ours - theirs).abs() <= bound).all(), ((ours - theirs).abs() / bound).max()
    # Without the outlier columns in float the difference would be far beyond that bound.
    plain = LLMInt8Weight(qw.weight, qw.absmax, float("inf")).reference_linear(x, bias)
    assert ((plain - theirs).abs() > bound).any()


def test_token_local_outlier_matches_bitsandbytes_within_quantization_error():
    """An outlier in one token only: bitsandbytes takes that token's scale over the values below the
    threshold, including the rest of the outlier column; effinfer leaves the whole outlier column
    out of every token's scale. Each result is within half an int8 step per input of the exact
    product, so they differ by at most the sum of both half steps, plus fp16 rounding."""
    weight, bias, x = _fp16_layer_and_activations(6, seed=1)
    x[:, 90] = 5.5  # below the threshold, above every other input
    x[2, 90] = -9.0  # column 90 is an outlier column because of token 2 alone
    bnb_layer = _bnb_linear(weight, bias)
    with torch.no_grad():
        theirs = bnb_layer(x.half()).float()
    qw = quantize_llm_int8(weight, 6.0)
    ours = llm_int8.apply(llm_int8.prepare(qw, bias, torch.float32), x)
    outlier_columns = torch.tensor([7, 90])
    regular = x.clone()
    regular[:, outlier_columns] = 0
    ours_step = regular.abs().amax(dim=1) / 127
    theirs_step = torch.where(x.abs() >= 6.0, 0.0, x.abs()).amax(dim=1) / 127
    assert (theirs_step > ours_step).any()  # the two definitions really differ here
    w = qw.dequantize()
    half_steps = (ours_step + theirs_step)[:, None] / 2 * w.abs().sum(dim=1)[None, :]
    bound = half_steps + 3 * FP16_UNIT_ROUNDOFF * _magnitude(x, w, bias)
    assert ((ours - theirs).abs() <= bound).all(), ((ours - theirs).abs() / bound).max()


def test_linear_runs_llm_int8_and_reports_the_outlier_share():
    weight, bias, qw = _layer()
    linear = Linear(128, [40, 56], bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    model = torch.nn.Sequential(linear)
    quantized = quantize_llm_int8(linear.weight.data)
    linear.set_quantized(quantized)
    linear.finalize()
    assert linear._kernel_state.backend == "llm_int8"
    assert linear.weight_nbytes() == 96 * 128 + 96 * 4 + 96 * 4
    x = _activations(5)
    _close(linear(x), quantized.reference_linear(x, bias), torch.float32)
    assert llm_int8_quant.outlier_share(model) == (2, 128)  # columns 7 and 90
    llm_int8_quant.reset_outlier_counts(model)
    assert llm_int8_quant.outlier_share(model) == (0, 0)


def test_quantize_options_for_the_bitsandbytes_methods():
    from effinfer.compress.quant.pipeline import QuantizeOptions
    from effinfer.config import ConfigError

    options = QuantizeOptions("llm_int8", threshold=4.0)
    assert (options.bits, options.group_size, options.format, options.threshold) == (
        8,
        None,
        "bitsandbytes",
        4.0,
    )
    nf4 = QuantizeOptions("nf4", group_size=-1, double_quant=True)
    assert (nf4.bits, nf4.group_size, nf4.format, nf4.double_quant) == (4, 64, "bitsandbytes", True)
    with pytest.raises(ConfigError):
        QuantizeOptions("rtn", double_quant=True)
    with pytest.raises(ConfigError):
        QuantizeOptions("fp4", bits=8)


@pytest.fixture(scope="module")
def stories_prompts():
    return ["Once upon a time", "The little dog"]


def test_llm_int8_stories260k_end_to_end(stories260k, stories_prompts, monkeypatch):
    """The pipeline's transform, loaded into ``LLM``: greedy tokens match the float model's."""
    from effinfer import LLM, SamplingParams
    from effinfer.compress.quant.pipeline import QuantizeOptions, apply_method
    from effinfer.loading import checkpoint as checkpoint_module
    from effinfer.loading.builder import finalize_model

    real_load_model = checkpoint_module.load_model

    def load_llm_int8(path, config, dtype, device, max_len, show_progress, stage=None):
        model = real_load_model(
            path, config, dtype, device, max_len, show_progress, finalize=False, stage=stage
        )
        with torch.no_grad():
            apply_method(model, QuantizeOptions("llm_int8"), None, show_progress=False)
        return finalize_model(model, device, dtype)

    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    float_llm = LLM(str(stories260k), dtype="float32", show_progress=False)
    expected = [o.outputs[0].token_ids for o in float_llm.generate(stories_prompts, greedy)]
    monkeypatch.setattr(checkpoint_module, "load_model", load_llm_int8)
    llm = LLM(str(stories260k), dtype="float32", show_progress=False)
    model = llm.engine.runner.model
    linears = quantizable_linears(model)
    assert linears and all(isinstance(m.quantized, LLMInt8Weight) for _, m in linears)
    assert all(m._kernel_state.backend == "llm_int8" for _, m in linears)
    got = [o.outputs[0].token_ids for o in llm.generate(stories_prompts, greedy)]
    assert got == expected
    outliers, total = llm_int8_quant.outlier_share(model)
    assert total > 0 and 0 <= outliers < total
