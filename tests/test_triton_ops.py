"""The fused Triton operators of a decoder layer (kernels/triton/: RMSNorm with residual, rotary,
SiLU-and-multiply, the paged KV store, paged decode attention with split context, varlen prefill
attention) against PyTorch references written out here, on small shapes: several block sizes,
ragged lengths with cached prefixes, GQA ratios, partition counts and sliding windows.

On CUDA they run natively in bf16; without CUDA under Triton's interpreter (``TRITON_INTERPRET=1``
with triton installed, fp16 because the interpreter's bf16 dot is broken; tests/test_triton_interpreted_ops.py
runs them so), and skip otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (HAS_CUDA or INTERPRET),
        reason="needs CUDA, or TRITON_INTERPRET=1 with triton (test_triton_interpreted_ops.py runs it so)",
    ),
]


def kernels():
    from effinfer.kernels.triton import gpu_ops

    loaded = gpu_ops.kernels()
    assert loaded is not None, f"the Triton operators did not load (is {gpu_ops.SWITCH}=0 set?)"
    return loaded


def assert_close(y: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    y, expected = y.float().cpu(), expected.float().cpu()
    assert y.shape == expected.shape
    assert torch.isfinite(y).all(), "non-finite output (an unwritten element?)"
    err = (y - expected).abs().max()
    assert err <= rel * max(expected.abs().max(), 1e-6), (
        f"max error {err:.3g} vs scale {expected.abs().max():.3g}"
    )


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
@pytest.mark.parametrize("hidden", [64, 100, 1536])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, hidden, with_residual):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=g).to(DEVICE, dtype)
    residual = torch.randn(5, hidden, generator=g).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    eps = 1e-6
    total = x + residual if with_residual else x
    xf = total.float()
    expected = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    result = kernels().fused_rms_norm.rms_norm(x, weight, eps, residual if with_residual else None)
    if with_residual:
        result, new_total = result
        assert torch.equal(new_total.cpu(), total.cpu()), "the residual sum must be the activation-dtype sum"
    assert_close(result, expected, tolerance(dtype))


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (12, 2, 64), (3, 1, 8), (20, 4, 80)])
def test_rotary_in_place_matches_reference(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads)
    tokens = 7
    # Queries and keys as the strided view of a qkv projection's output, values after them.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    values_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 1, 5, 9, 100, 3, 2])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    x = qk.float()
    half = head_dim // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    expected = x * cos.float()[:, None] + rotated_half * sin.float()[:, None]
    out = kernels().fused_rotary.rotary_(qk, cos[:, None], sin[:, None])
    assert out.data_ptr() == qk.data_ptr()
    assert_close(qk, expected, tolerance(dtype))
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], values_before), "values were touched"


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
@pytest.mark.parametrize("width", [16, 160, 1500])
def test_silu_mul_matches_reference(dtype, width):
    g = torch.Generator().manual_seed(width)
    gate_up = (3 * torch.randn(6, 2 * width, generator=g)).to(DEVICE, dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert_close(kernels().silu_mul.silu_and_mul(gate_up), expected, tolerance(dtype))


def paged_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(DEVICE, dtype), torch.randn(shape, generator=g).to(
        DEVICE, dtype
    )


def block_tables_for(context_lens: list[int], block_size: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Each sequence's blocks drawn at random from the pool (no block shared), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // block_size) for n in context_lens)
    rows = []
    for n in context_lens:
        needed = -(-n // block_size)
        rows.append(order[:needed] + [0] * (width - needed))
        order = order[needed:]
    return torch.tensor(rows, dtype=torch.long, device=DEVICE)


def gather_context(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys or values [length, kv_heads, d] of one sequence, read block by block."""
    return cache[table.cpu()].flatten(0, 1)[:length].float()


def reference_attention(q, keys, values, query_positions, scale, window):
    """q [Q, heads, d] at ``query_positions`` against keys / values [L, kv_heads, d], causal (and windowed)."""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    key_positions = torch.arange(keys.shape[0], device=q.device)
    visible = key_positions[None, :] <= query_positions[:, None]
    if window:
        visible &= key_positions[None, :] > query_positions[:, None] - window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
@pytest.mark.parametrize(
    ("block_size", "heads", "kv_heads", "head_dim", "context_lens", "partition", "window"),
    [
        (16, 4, 4, 16, [1, 17, 40], 512, None),  # MHA, one partition
        (16, 8, 2, 64, [300, 2100, 7], None, None),  # the default partitions (33 of them), long and short
        (8, 8, 2, 32, [33, 5, 64, 100], 32, None),  # GQA 4, several partitions, ragged
        (32, 6, 1, 64, [200, 31], 64, None),  # GQA 6 (padded to 8), a partition per two blocks
        (4, 12, 2, 8, [9, 50], 16, 20),  # tiny blocks and head dim, sliding window
        (16, 4, 2, 80, [70, 1, 0], 32, None),  # a head dim no power of two; a padding row (length 0)
    ],
)
def test_paged_decode_attention_matches_reference(
    dtype, block_size, heads, kv_heads, head_dim, context_lens, partition, window
):
    num_blocks = sum(-(-max(n, 1) // block_size) for n in context_lens) + 3
    k_cache, v_cache = paged_cache(num_blocks, block_size, kv_heads, head_dim, dtype, seed=block_size)
    tables = block_tables_for([max(n, 1) for n in context_lens], block_size, num_blocks, seed=heads)
    q = torch.randn(len(context_lens), heads, head_dim, generator=torch.Generator().manual_seed(1))
    q = q.to(DEVICE, dtype)
    lens = torch.tensor(context_lens, dtype=torch.long, device=DEVICE)
    scale = head_dim**-0.5
    out = kernels().paged_decode_attention.decode_attention(
        q, k_cache, v_cache, tables, lens, scale, window, partition_size=partition
    )
    for i, n in enumerate(context_lens):
        if n == 0:
            assert torch.equal(out[i].float().cpu(), torch.zeros(heads, head_dim)), "a padding row must be 0"
            continue
        keys, values = gather_context(k_cache, tables[i], n), gather_context(v_cache, tables[i], n)
        positions = torch.tensor([n - 1], device=DEVICE)
        expected = reference_attention(q[i : i + 1], keys, values, positions, scale, window)
        assert_close(out[i : i + 1], expected, tolerance(dtype))


@pytest.mark.parametrize(
    ("block_size", "heads", "kv_heads", "head_dim", "query_lens", "context_lens", "window"),
    [
        (16, 4, 4, 16, [10], [10], None),  # one prompt, nothing cached
        (16, 8, 2, 32, [70, 1, 33], [70, 20, 50], None),  # GQA; a decode row; a cached prefix of 17
        (8, 6, 2, 64, [5, 130], [37, 130], None),  # prefix not on a block edge; two query tiles
        (4, 4, 1, 8, [40, 9], [40, 60], 12),  # tiny blocks and head dim (padded to 16), sliding window
        (32, 4, 2, 80, [17], [100], None),  # head dim no power of two, long cached prefix
    ],
)
def test_varlen_prefill_attention_matches_reference(
    block_size, heads, kv_heads, head_dim, query_lens, context_lens, window
):
    dtype = DTYPE
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 2
    k_cache, v_cache = paged_cache(num_blocks, block_size, kv_heads, head_dim, dtype, seed=head_dim)
    tables = block_tables_for(context_lens, block_size, num_blocks, seed=block_size)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=torch.Generator().manual_seed(2))
    q = q.to(DEVICE, dtype)
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), device=DEVICE)
    lens = torch.tensor(context_lens, device=DEVICE)
    scale = head_dim**-0.5
    out = kernels().varlen_prefill_attention.prefill_attention(
        q, k_cache, v_cache, tables, starts, lens, max(query_lens), scale, window
    )
    for i, (q_len, n) in enumerate(zip(query_lens, context_lens)):
        rows = slice(int(starts[i]), int(starts[i + 1]))
        keys, values = gather_context(k_cache, tables[i], n), gather_context(v_cache, tables[i], n)
        positions = torch.arange(n - q_len, n, device=DEVICE)
        expected = reference_attention(q[rows], keys, values, positions, scale, window)
        assert_close(out[rows], expected, tolerance(dtype))


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
def test_kv_store_writes_slots_and_skips_negative_ones(dtype):
    kv_heads, head_dim, block_size, num_blocks = 2, 24, 4, 6
    k_cache, v_cache = paged_cache(num_blocks, block_size, kv_heads, head_dim, dtype, seed=3)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    g = torch.Generator().manual_seed(4)
    # k and v as strided views of one qkv row, as the attention layer hands them over.
    qkv = torch.randn(5, 3 * kv_heads * head_dim, generator=g).to(DEVICE, dtype)
    k = qkv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(5, kv_heads, head_dim)
    v = qkv[:, 2 * kv_heads * head_dim :].view(5, kv_heads, head_dim)
    slots = torch.tensor([3, 17, -1, 0, 22], device=DEVICE)
    kernels().paged_kv_store.store_kv(k, v, k_cache, v_cache, slots)
    written = slots >= 0
    expected_k = k_before.view(-1, kv_heads, head_dim).index_copy(0, slots[written], k[written])
    expected_v = v_before.view(-1, kv_heads, head_dim).index_copy(0, slots[written], v[written])
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim).cpu(), expected_k.cpu())
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim).cpu(), expected_v.cpu())


def test_start_up_self_test_passes_and_catches_a_wrong_kernel():
    from effinfer.kernels.triton import gpu_ops

    ops = kernels()
    assert gpu_ops.self_test(ops, torch.device(DEVICE), DTYPE) is None
    broken = type(ops)(**vars(ops))
    broken.silu_mul = type("Broken", (), {"silu_and_mul": staticmethod(lambda gate_up: gate_up[:, ::2] * 3)})
    assert "silu_and_mul" in gpu_ops.self_test(broken, torch.device(DEVICE), DTYPE)


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA, tests/test_cuda_graphs.py runs the real thing")
def test_model_on_the_triton_path_and_padded_graph_buffers_give_pytorchs_tokens(stories260k, monkeypatch):
    """The layers' Triton wiring end to end under the interpreter, on CPU tensors, with decode steps
    run through ``DecodeGraphs``' static, padded buffers (eagerly: there is no graph to capture).
    float16, so that prefill runs the varlen kernel (float32 prefill stays on PyTorch)."""
    from effinfer import LLM, SamplingParams
    from effinfer.engine.cuda_graphs import DecodeGraphs, graph_buckets
    from effinfer.kernels.cpu import fused
    from effinfer.kernels.triton import gpu_ops

    prompts = [
        "Once upon a time",
        "The little dog",
        "Lily and Ben went to the park and saw a big tree and a dog.",
    ]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    dtype = "float16"
    reference = LLM(str(stories260k), device="cpu", dtype=dtype, show_progress=False)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    expected.append(reference.generate(prompts[2], params)[0].outputs[0].token_ids)

    monkeypatch.setattr(fused, "usable", lambda x: False)
    monkeypatch.setattr(
        gpu_ops, "usable", lambda x: x.dtype in gpu_ops.DTYPES and not torch.is_grad_enabled()
    )
    replayed = []

    class EagerGraph:
        def __init__(self, graphs, bucket):
            self.graphs, self.bucket = graphs, bucket

        def replay(self):
            replayed.append(self.bucket)
            self.graphs._graphs[self.bucket][1].copy_(self.graphs._step(self.bucket))

    def fake_capture(graphs, bucket):
        graphs._graphs[bucket] = (EagerGraph(graphs, bucket), graphs._step(bucket))
        return True

    monkeypatch.setattr(DecodeGraphs, "_capture", fake_capture)
    llm = LLM(str(stories260k), device="cpu", dtype=dtype, show_progress=False)
    runner = llm.engine.runner
    runner.decode_graphs = DecodeGraphs(runner.model, runner.device, graph_buckets(64), 32, runner.block_size)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    again = llm.generate(prompts[2], params)[0]
    got.append(again.outputs[0].token_ids)
    assert again.num_cached_tokens > 0, "the prefix cache was not read"
    assert 4 in replayed and 1 in replayed, "decode steps did not go through the padded buffers"
    assert got == expected
