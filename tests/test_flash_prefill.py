"""The CPU flash prompt attention (kernels/cpu/flash_prefill.cpp) against PyTorch's float32 SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effinfer import LLM
from effinfer.kernels.cpu import flash_prefill

from .conftest import cpu_kernel_missing, make_hf_model
from .test_models_vs_hf import _all_position_logits

requires_flash = pytest.mark.skipif(
    cpu_kernel_missing(flash_prefill.extension), reason="CPU flash attention kernel unavailable"
)


def reference(q, k, v, heads, kv_heads, scale):
    """Causal attention in float32 on the same bf16 inputs, KV heads shared by heads / kv_heads queries."""
    tokens, d = q.shape[0], q.shape[1] // heads

    def heads_first(x, n):
        return x.float().reshape(tokens, n, d).transpose(0, 1).repeat_interleave(heads // n, 0)

    out = F.scaled_dot_product_attention(
        heads_first(q, heads), heads_first(k, kv_heads), heads_first(v, kv_heads), is_causal=True, scale=scale
    )
    return out.transpose(0, 1).reshape(tokens, heads * d)


@requires_flash
@pytest.mark.parametrize(
    "tokens, heads, kv_heads, d",
    [
        (1, 2, 1, 64),
        (15, 4, 2, 32),
        (16, 4, 4, 64),
        (17, 6, 2, 64),
        (65, 3, 1, 128),
        (200, 2, 2, 96),
        (513, 9, 3, 64),
    ],
)
@pytest.mark.parametrize("spread", [1.0, 8.0], ids=["ordinary", "peaked"])
def test_matches_float32_reference(tokens, heads, kv_heads, d, spread):
    """Strided q / k / v (views of one fused projection, as the layers pass them). The probabilities
    go through bf16 on the way to the P V product and the output is bf16: within 2^-7 of the largest
    output, and 2^-10 on average. "peaked" scores make the running maximum jump from block to block,
    so a wrong rescaling of the partial sums shows."""
    torch.manual_seed(tokens * 7 + heads + d)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * d) * spread**0.5).to(torch.bfloat16)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    scale = d**-0.5
    ours = flash_prefill.causal_attention(q, k, v, heads, kv_heads, scale).float()
    expected = reference(q, k, v, heads, kv_heads, scale)
    error = (ours - expected).abs()
    largest = expected.abs().max().item()
    assert error.max().item() <= 2**-7 * largest, (error.max().item(), largest)
    assert error.mean().item() <= 2**-10 * largest


@requires_flash
def test_bad_shapes_are_refused():
    q = torch.zeros(4, 2 * 64, dtype=torch.bfloat16)
    kv = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        flash_prefill.causal_attention(q, kv, kv, 3, 2, 0.125)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        flash_prefill.causal_attention(q, kv[:3], kv, 2, 1, 0.125)
    with pytest.raises(RuntimeError, match="bf16"):
        flash_prefill.causal_attention(q.float(), kv, kv, 2, 1, 0.125)


@requires_flash
def test_bfloat16_prefill_with_the_kernel_tracks_hf(tmp_path, monkeypatch):
    """The engine's bf16 prefill runs the kernel (head size 64) and stays as close to HF's float32
    logits as HF's own bf16 run is (the bound test_models_vs_hf uses for the bf16 engine)."""
    hf, path = make_hf_model(
        "LlamaForCausalLM", tmp_path, hidden_size=256, num_attention_heads=4, num_key_value_heads=2
    )
    llm = LLM(str(path), dtype="bfloat16", device="cpu", show_progress=False, enable_prefix_caching=False)
    calls = []
    kernel = flash_prefill.causal_attention
    monkeypatch.setattr(flash_prefill, "causal_attention", lambda *a: calls.append(1) or kernel(*a))
    prompt = [1] + list(range(40, 110))
    ours = _all_position_logits(llm, prompt)
    assert len(calls) == hf.config.num_hidden_layers
    with torch.no_grad():
        truth = hf(torch.tensor([prompt])).logits[0].float()
        hf_bf16 = hf.to(torch.bfloat16)(torch.tensor([prompt])).logits[0].float()

    def rms(t):
        return t.pow(2).mean().sqrt().item()

    ours_error, hf_error = ours - truth, hf_bf16 - truth
    assert rms(ours_error) <= 1.5 * rms(hf_error), (rms(ours_error), rms(hf_error))
    assert ours_error.abs().max() <= 2 * hf_error.abs().max()
