"""The fused CPU ops (kernels/cpu/fused_ops.cpp) against the PyTorch reference in layers/."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effinfer import LLM, SamplingParams
from effinfer.kernels.cpu import fused
from effinfer.layers.activation import gated
from effinfer.layers.attention import AttentionMetadata, PagedAttention
from effinfer.layers.norm import RMSNorm
from effinfer.layers.rotary import _rotate

from .conftest import cpu_kernel_missing, make_hf_model

requires_fused = pytest.mark.skipif(
    cpu_kernel_missing(fused.extension), reason="fused CPU ops unavailable here"
)
DTYPES = [torch.float32, torch.bfloat16]


def ops():
    return fused.extension()


def mostly_equal(ours: torch.Tensor, expected: torch.Tensor, equal_fraction: float, atol: float) -> None:
    """Equal bit for bit in most places; elsewhere off by at most ``atol`` relative to the largest value."""
    same = (ours == expected).float().mean().item()
    assert same >= equal_fraction, f"only {same:.4f} of the values are identical"
    scale = expected.float().abs().max().item()
    assert (ours.float() - expected.float()).abs().max().item() <= atol * scale


@requires_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 2048), (5, 40), (17, 72)])
def test_rms_norm_matches_reference(dtype, rows, hidden):
    torch.manual_seed(rows + hidden)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    wide = torch.randn(rows, hidden + 8, dtype=dtype) * 3
    x = wide[:, 3 : 3 + hidden]  # strided rows, as a slice of a fused projection would be
    residual = torch.randn(rows, hidden, dtype=dtype)
    with torch.inference_mode():
        alone = ops().rms_norm(x, None, norm.weight, norm.eps)[0]
        normed, summed = ops().rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(summed, x + residual)  # one rounding of the same sum
    equal = 0.99 if dtype == torch.bfloat16 else 0.0
    mostly_equal(alone, norm.reference(x), equal, 1e-2 if dtype == torch.bfloat16 else 1e-6)
    mostly_equal(normed, norm.reference(x + residual), equal, 1e-2 if dtype == torch.bfloat16 else 1e-6)


@requires_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64, 80])
def test_rotary_matches_reference_bit_for_bit(dtype, head_dim):
    torch.manual_seed(head_dim)
    tokens, heads, width = 7, 6, 6 * head_dim + 32
    qkv = torch.randn(tokens, width, dtype=dtype)
    qk = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    expected = _rotate(qk.clone(), cos[:, None], sin[:, None])
    untouched = qkv[:, heads * head_dim :].clone()
    ops().rotary_(qk, cos, sin)
    assert torch.equal(qk, expected)
    assert torch.equal(qkv[:, heads * head_dim :], untouched)


@requires_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inter", [(1, 5632), (3, 40)])
def test_silu_and_mul_matches_reference(dtype, rows, inter):
    torch.manual_seed(inter)
    gate_up = torch.randn(rows, 2 * inter, dtype=dtype) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-3])  # exp's clamped ends and zero
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    ours = ops().silu_and_mul(gate_up)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, expected, rtol=2e-6, atol=1e-6)
    else:
        mostly_equal(ours, expected, 0.99, 1e-2)


# Context lengths: below, at and above multiples of 8 (the bf16 path scores eight keys per pass).
CONTEXT_LENS = [6, 13, 20, 4, 11, 18, 16, 8, 1]


def paged_problem(dtype, num_seqs, heads, kv_heads, head_dim, block_size=4, seed=0):
    """A shuffled block pool holding ``num_seqs`` contexts of different lengths, and one query each."""
    gen = torch.Generator().manual_seed(seed)
    lens = CONTEXT_LENS[:num_seqs]
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in per_seq:
        tables.append(order[start : start + n])
        start += n
    width = max(per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.zeros(num_seqs, dtype=torch.long),
        block_tables=block_tables,
        context_lens=lens,
        query_lens=[1] * num_seqs,
        block_size=block_size,
        context_lens_tensor=torch.tensor(lens),
    )
    return q, k_cache, v_cache, meta


def reference_decode(q, k_cache, v_cache, meta, window):
    """Plain softmax attention over each sequence's gathered context, in float64."""
    num_seqs, heads, d = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(num_seqs, heads, d, dtype=torch.float64)
    for b, n in enumerate(meta.context_lens):
        slots = torch.tensor(
            [int(meta.block_tables[b, p // block_size]) * block_size + p % block_size for p in range(n)]
        )
        k = k_cache.view(-1, kv_heads, d)[slots].double()
        v = v_cache.view(-1, kv_heads, d)[slots].double()
        first = 0 if window is None else max(0, n - window)
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            scores = (k[first:, kvh] @ q[b, h].double()) * d**-0.5
            out[b, h] = torch.softmax(scores, 0) @ v[first:, kvh]
    return out.reshape(num_seqs, heads * d)


@requires_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, window",
    [(4, 4, 8, None), (8, 2, 64, None), (8, 1, 80, 5), (4, 2, 128, 9), (32, 1, 64, None), (4, 2, 256, 12)],
)
def test_decode_attention_matches_reference(dtype, heads, kv_heads, head_dim, window):
    q, k_cache, v_cache, meta = paged_problem(
        dtype, len(CONTEXT_LENS), heads, kv_heads, head_dim, seed=heads + head_dim
    )
    expected = reference_decode(q, k_cache, v_cache, meta, window)
    ours = ops().decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens_tensor, head_dim**-0.5, window or -1
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output is rounded once
    torch.testing.assert_close(ours.double(), expected, rtol=tol, atol=tol)
    # The PyTorch path the layer takes without the fused op agrees too.
    layer = PagedAttention(heads, kv_heads, head_dim, window)
    layer.k_cache, layer.v_cache = k_cache, v_cache
    torch.testing.assert_close(
        ours.double(), layer._decode_reference(q, meta).reshape(ours.shape).double(),
        rtol=0 if dtype == torch.float32 else 3e-2, atol=1e-5 if dtype == torch.float32 else 3e-2,
    )  # fmt: skip


@requires_fused
def test_bad_input_gets_a_clear_error():
    q, k_cache, v_cache, meta = paged_problem(torch.float32, 2, 4, 2, 8)
    too_long = meta.context_lens_tensor.clone()
    too_long[1] = 10_000
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        ops().decode_attention(q, k_cache, v_cache, meta.block_tables, too_long, 1.0, -1)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        ops().silu_and_mul(torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="must match x"):
        ops().rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="head_dim even"):
        ops().decode_attention(q[..., :7].contiguous(), k_cache[..., :7].contiguous(), v_cache[..., :7].contiguous(),
                               meta.block_tables, meta.context_lens_tensor, 1.0, -1)  # fmt: skip


def test_layers_use_the_reference_under_autograd_and_when_switched_off(monkeypatch):
    norm = RMSNorm(16)
    x = torch.randn(3, 16, requires_grad=True)
    norm(x).sum().backward()  # the fused op has no backward: training must take the reference
    assert x.grad is not None and norm.weight.grad is not None
    with torch.inference_mode():
        assert fused.usable(x.detach()) == (fused.extension() is not None)
    monkeypatch.setattr(fused, "extension", lambda: None)
    with torch.inference_mode():
        assert not fused.usable(x.detach())
        gate_up = torch.randn(2, 8)
        torch.testing.assert_close(gated(gate_up, F.silu), F.silu(gate_up[:, :4]) * gate_up[:, 4:])


@requires_fused
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_greedy_tokens_are_the_same_with_and_without_fused_ops(arch, tmp_path, monkeypatch):
    """float32: the fused path and the PyTorch path must pick the same tokens (HF equality is tested elsewhere)."""
    extra = {"sliding_window": 16} if arch == "MistralForCausalLM" else {}
    _, path = make_hf_model(arch, tmp_path, **extra)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[1, 17, 99, 305], [1] + list(range(40, 63))]
    # No prefix caching: the second run must not reuse blocks the first one computed.
    llm = LLM(str(path), dtype="float32", device="cpu", show_progress=False, enable_prefix_caching=False)
    calls = CountingOps(ops())
    monkeypatch.setattr(fused, "extension", lambda: calls)
    with_fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    # They really ran: prefill's rotary, decode steps' one-call attention block (rotary, KV store,
    # attention), the norms and the gated MLP.
    assert {"rms_norm", "rotary_", "silu_and_mul", "decode_attention_block"} <= set(calls.counts)
    monkeypatch.setattr(fused, "extension", lambda: None)
    without = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert with_fused == without


class CountingOps:
    """The fused-op module, counting the calls to each op."""

    def __init__(self, module):
        self.module, self.counts = module, {}

    def __getattr__(self, name):
        op = getattr(self.module, name)

        def counted(*args):
            self.counts[name] = self.counts.get(name, 0) + 1
            return op(*args)

        return counted
