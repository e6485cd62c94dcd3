"""SmoothQuant W8A8 and its int8 GEMM kernel, held to the fake-quant reference and to the float model."""

from __future__ import annotations

import pytest
import torch

from effinfer.compress.quant import smoothquant
from effinfer.config import ModelConfig
from effinfer.kernels import w8a8
from effinfer.layers.linear import quantizable_linears
from effinfer.loading.safetensors import load_model
from effinfer.quant.activations import fake_quantize_activations, quantize_activations_int8
from effinfer.quant.integer import quantize_rtn


def _bf16_ulp_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # Both sides quantize x identically; they differ only in fp32 summation order, i.e. by at most
    # one unit of the output dtype's last place (relative), plus tiny absolute noise near zero.
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    atol = 1e-4 * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("act_quant", ["int8", "int8-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_w8a8_kernel_matches_fake_quant_reference(act_quant, dtype, rows):
    torch.manual_seed(rows)
    weight = torch.randn(96, 128) * torch.rand(96, 1)  # rows of very different ranges
    bias = torch.randn(96)
    qw = quantize_rtn(weight, 8, None, True)
    state = w8a8.prepare(qw, bias, act_quant, dtype)
    if torch.backends.mkldnn.is_available():
        assert state.backend == "onednn"
    x = (torch.randn(rows, 128) * torch.rand(rows, 1) * 5).to(dtype)
    x[:, 7] *= 30  # an outlier channel
    y = w8a8.apply(state, x)
    assert y.dtype == dtype and y.shape == (rows, 96)
    _bf16_ulp_close(y, qw.reference_linear(x, bias, act_quant), dtype)
    # Leading dimensions are kept.
    y3 = w8a8.apply(state, x.reshape(1, rows, 128))
    assert y3.shape == (1, rows, 96)
    torch.testing.assert_close(y3[0], y)


def test_activation_codes_equal_fake_quantization():
    x = torch.randn(6, 50) * 3
    for mode in ("int8", "int8-tensor"):
        codes, scale = quantize_activations_int8(x, mode)
        assert codes.dtype == torch.int8 and codes.abs().max() <= 127
        assert torch.equal(codes.float() * scale, fake_quantize_activations(x, mode))


def test_w8a8_falls_back_to_reference_for_grouped_weights():
    weight = torch.randn(32, 64)
    qw = quantize_rtn(weight, 8, 16, True)  # 4 groups per row: not an int8-GEMM weight
    state = w8a8.prepare(qw, None, "int8", torch.float32)
    assert state.backend == "reference"
    x = torch.randn(3, 64)
    torch.testing.assert_close(w8a8.apply(state, x), qw.reference_linear(x, None, "int8"))


@pytest.fixture(scope="module")
def stories(stories260k, shared_data):
    from effinfer.tokenizer import Tokenizer

    config = ModelConfig.from_dir(stories260k)
    text = (shared_data / "text" / "tinystories_valid.txt").read_text()
    ids = Tokenizer.from_dir(stories260k).encode(text[-40_000:])
    calib = torch.tensor(ids[: 8 * 128]).view(8, 128)
    evaluation = torch.tensor(ids[8 * 128 : 10 * 128]).view(2, 128)
    return stories260k, config, calib, evaluation


def _float_model(path, config):
    return load_model(path, config, torch.float32, torch.device("cpu"), 256, False, finalize=False)


def _logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model.forward_dense(ids))


def test_smoothing_alone_leaves_the_float_model_unchanged(stories):
    path, config, calib, evaluation = stories
    model = _float_model(path, config)
    before = _logits(model, evaluation)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    smoothquant.smooth_model(model, calib, alpha=0.5, smooth_inner=True)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)
    torch.testing.assert_close(_logits(model, evaluation), before, rtol=1e-4, atol=1e-4)


def _inject_outlier_channels(model, channels=(3, 17, 40), factor=40.0):
    """Make a few hidden channels ~40x larger going into q/k/v and gate/up, as in large LLMs.

    Exact for the float model: the norm weight grows by ``factor`` and the Linear's columns shrink.
    """
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linear in (
                (layer.input_layernorm, layer.self_attn.qkv_proj),
                (layer.post_attention_layernorm, layer.mlp.gate_up_proj),
            ):
                for c in channels:
                    norm.weight[c] *= factor
                    linear.weight[:, c] /= factor


def _relative_error(logits, reference):
    return ((logits - reference).norm() / reference.norm()).item()


def test_smoothquant_recovers_what_outlier_channels_cost_naive_w8a8(stories):
    path, config, calib, evaluation = stories
    reference = _logits(_float_model(path, config), evaluation)

    def quantized(method):
        model = _float_model(path, config)
        _inject_outlier_channels(model)
        method(model)
        return _relative_error(_logits(model, evaluation), reference)

    no_smoothing = quantized(lambda m: smoothquant.quantize_model_naive_w8a8(m, per_tensor=False))
    smoothed = quantized(lambda m: smoothquant.quantize_model_smoothquant(m, calib, 0.5, show_progress=False))
    per_tensor = quantized(smoothquant.quantize_model_naive_w8a8)
    assert smoothed < 0.5 * no_smoothing, (smoothed, no_smoothing)
    assert smoothed < per_tensor, (smoothed, per_tensor)


def test_smoothquant_layers_are_w8a8_and_run_the_int8_kernel_like_the_reference(stories):
    path, config, calib, evaluation = stories
    reference = _logits(_float_model(path, config), evaluation)
    model = _float_model(path, config)
    smoothquant.quantize_model_smoothquant(model, calib, alpha=0.5, show_progress=False)
    for _, linear in quantizable_linears(model):
        qw = linear.quantized
        assert linear.act_quant == "int8" and qw.bits == 8 and qw.num_groups == 1 and qw.symmetric
    fake_quant = _relative_error(_logits(model, evaluation), reference)  # no kernel yet: the reference
    for _, linear in quantizable_linears(model):
        linear.finalize()
        assert linear._kernel_state.backend == "w8a8"
    kernel = _relative_error(_logits(model, evaluation), reference)
    # Each layer equals the reference to float rounding (tested above), but over a whole model a
    # rounding difference can flip an activation code, after which the two runs are different draws
    # of the same quantization noise: compare their distance to the float model, not to each other.
    assert fake_quant < 0.05 and kernel < 0.05
    assert 0.5 < kernel / fake_quant < 2, (kernel, fake_quant)


def test_naive_w8a8_has_one_scale_per_checkpoint_tensor(stories):
    path, config, _, _ = stories
    model = _float_model(path, config)
    linear = model.model.layers[0].self_attn.qkv_proj
    weight = linear.weight.detach().clone()
    smoothquant.quantize_model_naive_w8a8(model)
    assert linear.act_quant == "int8-tensor"
    qw = linear.quantized
    start = 0
    for rows in linear.shard_sizes:
        shard = weight[start : start + rows]
        scales = qw.scales[start : start + rows]
        expected = shard.abs().max() / 127
        torch.testing.assert_close(scales, torch.full_like(scales, expected.item()))
        error = (qw.dequantize()[start : start + rows] - shard).abs().max()
        assert error <= expected / 2 * (1 + 1e-5)
        start += rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("act_quant", ["int8", "int8-tensor"])
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_w8a8_int_mm_on_cuda_matches_reference(act_quant, rows):
    torch.manual_seed(rows)
    weight = torch.randn(256, 512, device="cuda")
    bias = torch.randn(256, device="cuda")
    qw = quantize_rtn(weight, 8, None, True)
    state = w8a8.prepare(qw, bias, act_quant, torch.bfloat16)
    assert state.backend == "int_mm"
    x = torch.randn(rows, 512, device="cuda").to(torch.bfloat16)
    _bf16_ulp_close(w8a8.apply(state, x), qw.reference_linear(x, bias, act_quant), torch.bfloat16)
