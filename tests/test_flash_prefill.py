"""The CPU flash prompt attention (kernels/cpu/flash_prefill.cpp) against PyTorch's float32 SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effinfer import LLM, SamplingParams
from effinfer.kernels.cpu import flash_prefill

from .conftest import cpu_kernel_missing, make_hf_model
from .test_models_vs_hf import _all_position_logits

requires_flash = pytest.mark.skipif(
    cpu_kernel_missing(flash_prefill.extension), reason="CPU flash attention kernel unavailable"
)


def reference(q, k, v, heads, kv_heads, scale, window=None):
    """Attention in float32 on the same bf16 inputs: the queries are the last of k's positions, each
    sees keys up to its own (and, with a window, after position - window); KV heads are shared by
    heads / kv_heads queries."""
    queries, keys, d = q.shape[0], k.shape[0], q.shape[1] // heads

    def heads_first(x, n):
        return x.float().reshape(x.shape[0], n, d).transpose(0, 1).repeat_interleave(heads // n, 0)

    q_pos = torch.arange(keys - queries, keys)[:, None]
    k_pos = torch.arange(keys)[None, :]
    visible = k_pos <= q_pos
    if window:
        visible &= k_pos > q_pos - window
    out = F.scaled_dot_product_attention(
        heads_first(q, heads),
        heads_first(k, kv_heads),
        heads_first(v, kv_heads),
        attn_mask=visible,
        scale=scale,
    )
    return out.transpose(0, 1).reshape(queries, heads * d)


def check(q, k, v, heads, kv_heads, window=None):
    """Within 2^-7 of the largest output, and 2^-10 on average: the probabilities go through bf16 on
    the way to the P V product, and the output is bf16."""
    scale = (q.shape[1] // heads) ** -0.5
    ours = flash_prefill.causal_attention(q, k, v, heads, kv_heads, scale, window).float()
    expected = reference(q, k, v, heads, kv_heads, scale, window)
    error = (ours - expected).abs()
    largest = expected.abs().max().item()
    assert error.max().item() <= 2**-7 * largest, (error.max().item(), largest)
    assert error.mean().item() <= 2**-10 * largest


def fused_projection(queries, keys, heads, kv_heads, d, spread, seed):
    """q [queries, heads * d] and k, v [keys, kv_heads * d] as strided views of one bf16 projection."""
    torch.manual_seed(seed)
    qkv = (torch.randn(keys, (heads + 2 * kv_heads) * d) * spread**0.5).to(torch.bfloat16)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    return q[keys - queries :], k, v


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
    """A whole prompt. "peaked" scores make the running maximum jump from block to block, so a
    wrong rescaling of the partial sums shows."""
    check(
        *fused_projection(tokens, tokens, heads, kv_heads, d, spread, seed=tokens * 7 + heads + d),
        heads,
        kv_heads,
    )


@requires_flash
@pytest.mark.parametrize(
    "queries, keys, window",
    [
        (1, 50, None),
        (20, 100, None),
        (64, 200, None),
        (16, 16, 4),
        (100, 100, 33),
        (70, 300, 64),
        (1, 300, 100),
    ],
)
@pytest.mark.parametrize("spread", [1.0, 8.0], ids=["ordinary", "peaked"])
def test_cached_prefix_and_window_match_float32_reference(queries, keys, window, spread):
    """A chunk after a cached prefix (queries are the last positions), and sliding windows (blocks
    before a row's window are skipped; a row may see nothing in the block its 16 rows start in)."""
    check(*fused_projection(queries, keys, 4, 2, 64, spread, seed=queries + keys), 4, 2, window)


@requires_flash
def test_bad_shapes_are_refused():
    q = torch.zeros(4, 2 * 64, dtype=torch.bfloat16)
    kv = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        flash_prefill.causal_attention(q, kv, kv, 3, 2, 0.125)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        flash_prefill.causal_attention(q, kv[:3], kv, 2, 1, 0.125)  # fewer keys than queries
    with pytest.raises(RuntimeError, match="bf16"):
        flash_prefill.causal_attention(q.float(), kv, kv, 2, 1, 0.125)
    with pytest.raises(RuntimeError, match="window"):
        flash_prefill.causal_attention(q, kv, kv, 2, 1, 0.125, -3)


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


@requires_flash
def test_prefix_cache_hits_and_chunks_run_the_kernel_and_match_sdpa(tmp_path, monkeypatch):
    """Prompts that continue a cached prefix, in chunks, on a sliding-window model: the kernel runs
    with more keys than queries, and greedy generation matches the SDPA path's."""
    _, path = make_hf_model(
        "MistralForCausalLM", tmp_path, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=24,
    )  # fmt: skip
    prefix = list(range(3, 43))
    prompts = [prefix + [50, 51, 52], prefix + [60, 61, 62, 63, 64]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def generate():
        llm = LLM(str(path), dtype="bfloat16", device="cpu", show_progress=False, enable_prefix_caching=True,
                  enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=1)  # fmt: skip
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    shapes = []
    kernel = flash_prefill.causal_attention
    monkeypatch.setattr(
        flash_prefill,
        "causal_attention",
        lambda q, k, *a: shapes.append((len(q), len(k))) or kernel(q, k, *a),
    )
    with_kernel = generate()
    assert any(keys > queries > 1 for queries, keys in shapes), shapes
    monkeypatch.setattr(flash_prefill, "usable", lambda *a: False)
    assert generate() == with_kernel
