"""GPTQ and AWQ: against RTN, against a slow textbook GPTQ, and on the trained stories260K model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effinfer.compress.calibration import ROWS_PER_CHUNK, calibration_batches, run_layerwise
from effinfer.compress.quant.awq import awq_pairs, pseudo_quantize, quantize_model_awq
from effinfer.compress.quant.gptq import gptq_quantize_weight, quantize_model_gptq
from effinfer.compress.quant.rtn import quantize_model_rtn
from effinfer.config import ModelConfig
from effinfer.layers.linear import Linear
from effinfer.loading.safetensors import load_model
from effinfer.quant.integer import group_qparams, quantize_codes, quantize_rtn
from effinfer.tokenizer import Tokenizer

from .conftest import make_hf_model

# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: a thread pool only adds overhead, and stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Activations with a low-rank structure and uneven channel scales, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, 12, generator=g) @ torch.randn(12, width, generator=g)
    channel_scale = torch.exp(torch.randn(width, generator=g) * 0.7)
    return (low_rank + 0.3 * torch.randn(n, width, generator=g)) * channel_scale


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((x @ w.T - x @ w_hat.T).norm() / (x @ w.T).norm()).item()


def load_float(path, dtype=torch.float32):
    config = ModelConfig.from_dir(path)
    model = load_model(path, config, dtype, torch.device("cpu"), 512, show_progress=False, finalize=False)
    return model


def nll(model, ids: torch.Tensor) -> float:
    """Mean next-token NLL (nats) of rows [B, T], computed densely."""
    with torch.no_grad():
        logits = model.compute_logits(model.forward_dense(ids)).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def stories_text(shared_data) -> str:
    path = shared_data / "text" / "tinystories_valid.txt"
    if not path.is_file():
        pytest.skip("tinystories_valid.txt is not present")
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- GPTQ on one Linear


@pytest.mark.parametrize(
    "bits,group,symmetric", [(4, 32, True), (4, 32, False), (3, 32, True), (3, None, False)]
)
def test_gptq_beats_rtn(bits, group, symmetric):
    x = correlated_inputs(2048, 172)  # 172 = stories260K's down projection: a short last group
    w = torch.randn(48, 172, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = 2 * x.T @ x / len(x)
    qw = gptq_quantize_weight(w, hessian, bits, group, symmetric)
    # codes on the grid, parameters in range
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= 2**bits - 1
    assert qw.scales.shape == (48, -(-172 // (group or 172))) and (qw.scales > 0).all()
    assert int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= 2**bits - 1
    if symmetric:
        assert qw.symmetric
    assert qw.g_idx is None
    rtn = output_error(x, w, quantize_rtn(w, bits, group, symmetric).dequantize())
    gptq = output_error(x, w, qw.dequantize())
    assert gptq < 0.6 * rtn, (gptq, rtn)


def test_gptq_act_order_g_idx():
    x = correlated_inputs(2048, 172, seed=2)
    w = torch.randn(40, 172, generator=torch.Generator().manual_seed(3)) * 0.05
    hessian = 2 * x.T @ x / len(x)
    qw = gptq_quantize_weight(w, hessian, 4, 32, symmetric=True, act_order=True)
    assert qw.g_idx is not None and qw.g_idx.dtype == torch.int32 and qw.g_idx.shape == (172,)
    # groups follow decreasing Hessian diagonal: 5 full groups of 32 and one of 12
    order = torch.argsort(hessian.diagonal(), descending=True)
    assert torch.equal(qw.g_idx[order].long(), torch.arange(172) // 32)
    assert qw.has_act_order() and qw.num_groups == 6
    assert torch.bincount(qw.g_idx.long()).tolist() == [32] * 5 + [12]
    rtn = output_error(x, w, quantize_rtn(w, 4, 32, True).dequantize())
    act = output_error(x, w, qw.dequantize())
    assert act < 0.6 * rtn, (act, rtn)
    # static groups: act-order processing, natural grouping (no g_idx)
    static = gptq_quantize_weight(w, hessian, 4, 32, symmetric=True, act_order=True, static_groups=True)
    assert static.g_idx is None
    assert output_error(x, w, static.dequantize()) < 0.6 * rtn


def test_gptq_dead_columns():
    x = correlated_inputs(512, 64, seed=4)
    x[:, [3, 40]] = 0  # inputs that never fire
    w = torch.randn(16, 64)
    qw = gptq_quantize_weight(w, 2 * x.T @ x / len(x), 4, 16, symmetric=False)
    assert torch.isfinite(qw.scales).all()
    assert (qw.dequantize()[:, [3, 40]] == 0).all()


def textbook_gptq(w, hessian, bits, group, symmetric, act_order, damp):
    """GPTQ straight from the paper's equations (2)-(3), one column at a time, no Cholesky, no blocks.

    Quantize column q, spread its error over the remaining columns F with
    delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{q,F}, then remove q from H_F^-1 by
    Gaussian elimination: H^-1 <- H^-1 - H^-1_{:,q} H^-1_{q,:} / [H^-1]_qq.
    """
    w, h = w.double().clone(), hessian.double().clone()
    cols = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(w.shape, dtype=torch.long)
    scales, zeros = [], []
    for q in range(cols):
        if q % group == 0:
            scale, zero = group_qparams(w[:, q : q + group], bits, symmetric)
            scales.append(scale)
            zeros.append(zero)
        code = quantize_codes(w[:, q : q + 1], scale, zero, bits)[:, 0]
        codes[:, q] = code.long()
        err = (w[:, q] - (code.double() - zero.double()) * scale.double()) / hinv[q, q]
        w[:, q:] -= err[:, None] * hinv[q, q:][None, :]
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    g_idx = torch.empty(cols, dtype=torch.long)
    g_idx[perm] = torch.arange(cols) // group
    return out, torch.stack(scales, 1), torch.stack(zeros, 1), g_idx


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("cols,symmetric", [(48, True), (44, False)])
def test_gptq_matches_textbook(cols, symmetric, act_order):
    # block_size 16 with group 8: several lazy blocks, several groups per block
    x = correlated_inputs(256, cols, seed=5).double()
    x[:, 7] = 0
    w = torch.randn(12, cols, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    hessian = 2 * x.T @ x / len(x)
    qw = gptq_quantize_weight(w, hessian, 3, 8, symmetric, act_order=act_order, block_size=16)
    codes, scales, zeros, g_idx = textbook_gptq(w, hessian, 3, 8, symmetric, act_order, 0.01)
    assert torch.equal(qw.qweight.long(), codes)
    torch.testing.assert_close(qw.scales, scales.float(), rtol=1e-6, atol=0)
    assert torch.equal(qw.zeros.long(), zeros.long())
    assert torch.equal(qw.group_index(), g_idx)


# ---------------------------------------------------------------- AWQ


def test_pseudo_quantize_is_rtn():
    w = torch.randn(10, 172)
    for symmetric in (True, False):
        torch.testing.assert_close(
            pseudo_quantize(w, 4, 32, symmetric), quantize_rtn(w, 4, 32, symmetric).dequantize()
        )


@pytest.fixture(scope="module")
def tiny_mha(tmp_path_factory):
    # equal q and kv heads: the (v -> o_proj) pair is used
    _, path = make_hf_model("LlamaForCausalLM", tmp_path_factory.mktemp("mha"), num_key_value_heads=8)
    return path


@pytest.mark.parametrize("which", ["stories260k", "tiny_mha"])
def test_awq_folding_keeps_logits(which, request):
    path = request.getfixturevalue(which)
    model = load_float(path)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.compute_logits(model.forward_dense(ids))
        gen = torch.Generator().manual_seed(1)
        for layer in model.decoder_layers():
            pairs = awq_pairs(model, layer)
            expected = 4 if layer.self_attn.num_kv_heads == layer.self_attn.num_heads else 3
            assert [p.name for p in pairs][:1] == ["qkv"] and len(pairs) == expected
            for pair in pairs:
                pair.fold(torch.exp(torch.randn(pair.channels, generator=gen)))
        after = model.compute_logits(model.forward_dense(ids))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_awq_salient_channels(stories260k, shared_data):
    """A few activation channels 30x larger (weights 30x smaller, same float model): RTN rounds
    those weights away, AWQ scales them up first."""
    text = stories_text(shared_data)
    tokenizer = Tokenizer.from_dir(stories260k)
    calib = calibration_batches(tokenizer, text[:60000], num_samples=8, seq_len=128)
    test_ids = calibration_batches(tokenizer, text[100000:140000], num_samples=4, seq_len=256)

    def salient_model():
        model = load_float(stories260k)
        channels = torch.tensor([5, 17, 40, 51])
        with torch.no_grad():
            for layer in model.model.layers:
                for norm, linear in [
                    (layer.input_layernorm, layer.self_attn.qkv_proj),
                    (layer.post_attention_layernorm, layer.mlp.gate_up_proj),
                ]:
                    norm.weight[channels] *= 30
                    linear.weight[:, channels] /= 30
        return model

    reference = salient_model()
    with torch.no_grad():
        target = reference.forward_dense(test_ids)
    errors = {}
    for method in ("rtn", "awq"):
        model = salient_model()
        with torch.no_grad():
            if method == "rtn":
                quantize_model_rtn(model, 4, 32, symmetric=False, show_progress=False)
            else:
                quantize_model_awq(
                    model, calib, 4, 32, symmetric=False, clip=False, grid=10, show_progress=False
                )
            errors[method] = (model.forward_dense(test_ids) - target).pow(2).mean().item()
    print(errors)
    assert errors["awq"] < 0.5 * errors["rtn"], errors


# ---------------------------------------------------------------- whole model, stories260K


def test_stories260k_gptq_awq_beat_rtn(stories260k, shared_data):
    text = stories_text(shared_data)
    tokenizer = Tokenizer.from_dir(stories260k)
    calib = calibration_batches(tokenizer, text[200000:300000], num_samples=16, seq_len=256)
    test_ids = calibration_batches(tokenizer, text[:120000], num_samples=24, seq_len=256)
    results = {"float": nll(load_float(stories260k), test_ids)}
    for method in ("rtn-sym", "rtn-asym", "gptq", "awq"):
        model = load_float(stories260k)
        with torch.no_grad():
            if method.startswith("rtn"):
                quantize_model_rtn(model, 4, 32, symmetric=method == "rtn-sym", show_progress=False)
            elif method == "gptq":
                quantize_model_gptq(model, calib, 4, 32, symmetric=True, show_progress=False)
            else:
                quantize_model_awq(model, calib, 4, 32, symmetric=False, show_progress=False)
        assert all(
            lin.quantized is not None for lin in model.model.layers.modules() if isinstance(lin, Linear)
        )
        assert model.lm_head.quantized is None
        results[method] = nll(model, test_ids)
    print({k: round(math.exp(v), 4) for k, v in results.items()})
    assert results["gptq"] < results["rtn-sym"]
    assert results["awq"] < results["rtn-asym"]


def test_bfloat16_model(stories260k, shared_data):
    text = stories_text(shared_data)
    tokenizer = Tokenizer.from_dir(stories260k)
    calib = calibration_batches(tokenizer, text[:20000], num_samples=4, seq_len=128)
    baseline = nll(load_float(stories260k), calib)
    for quantize in (
        lambda m: quantize_model_gptq(m, calib, 4, 32, act_order=True, show_progress=False),
        lambda m: quantize_model_awq(m, calib, 4, 32, grid=5, show_progress=False),
    ):
        model = load_float(stories260k, torch.bfloat16)
        with torch.no_grad():
            quantize(model)
        assert abs(nll(model, calib) - baseline) < 0.15


# ---------------------------------------------------------------- calibration rows and runner


def test_runner_feeds_each_layer_its_input(stories260k):
    """With nothing transformed, each layer sees what it sees inside ``forward_dense`` (row chunks
    and the shared rotary table included), and ``forward`` gives the next layer's input."""
    model = load_float(stories260k)
    ids = torch.randint(3, 500, (ROWS_PER_CHUNK + 3, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for layer in model.model.layers
    ]
    with torch.no_grad():
        model.forward_dense(ids)
    for hook in hooks:
        hook.remove()
    visited = []

    def check(step):
        torch.testing.assert_close(step.hidden, seen[step.index], rtol=1e-5, atol=1e-5)
        if step.index + 1 < len(seen):
            torch.testing.assert_close(step.forward(), seen[step.index + 1], rtol=1e-5, atol=1e-5)
        visited.append(step.index)

    run_layerwise(model, ids, check, show_progress=False)
    assert visited == list(range(len(model.model.layers)))


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [1] + [ord(c) % 250 + 3 for c in text]


def test_calibration_batches(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("abcdefghij\n" * 100)  # 1100 chars -> 1101 tokens
    rows = calibration_batches(CharTokenizer(), path, num_samples=4, seq_len=100, seed=0)
    assert rows.shape == (4, 100) and rows.dtype == torch.long
    assert torch.equal(rows, calibration_batches(CharTokenizer(), str(path), 4, 100, seed=0))
    # more rows asked than fit: all 11 non-overlapping rows, in text order
    every = calibration_batches(CharTokenizer(), path, num_samples=100, seq_len=100)
    assert every.shape == (11, 100) and every[0, 0] == 1
    # overlapping rows: one every 50 tokens
    overlapping = calibration_batches(CharTokenizer(), path, num_samples=100, seq_len=100, stride=50)
    assert overlapping.shape == (21, 100) and torch.equal(overlapping[1, :50], overlapping[0, 50:])
    # shorter than one row: one row of all tokens
    assert calibration_batches(CharTokenizer(), "short text\n" * 3, seq_len=512).shape == (1, 34)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibration_batches(CharTokenizer(), tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="too few"):
        calibration_batches(CharTokenizer(), "hi\n", seq_len=512)
