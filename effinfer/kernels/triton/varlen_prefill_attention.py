"""Variable-length (packed) causal prefill attention over the paged cache, in Triton.

Papers: FlashAttention-2 (Dao 2023) for the tiling (a program per block of query rows and head,
the keys streamed in tiles with an online softmax, both products on tensor cores); vLLM's
PagedAttention (Kwon et al. 2023) and its prefix-prefill kernel for reading the context through
block tables. Idea: a step packs many sequences' queries into one flat batch ([T, heads, d],
``cu_seqlens`` marking where each starts); one launch covers them all instead of one attention
call per sequence.

Prefix caching: every key and value is read from the paged cache, cached prefix and this step's
fresh tokens alike (the layer stores the fresh ones first), so a sequence whose first P tokens
came from the prefix cache needs nothing special: its queries sit at positions P.. and see keys
0..their own position. The cost is re-reading the fresh keys from the cache once, which is small
next to the products.

Switch on: automatic for CUDA fp16 / bf16 tensors (``kernels/triton/gpu_ops.py``;
``EFFINFER_TRITON_OPS=0`` off); float32 keeps PyTorch's attention (tensor cores would round it to tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effinfer.kernels.triton.paged_decode_attention import online_softmax_step
from effinfer.kernels.triton.paged_kv_store import paged_tile

BLOCK_M = 64  # query rows per program
BLOCK_N = 32  # keys per tile
DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_starts_ptr, context_lens_ptr,
    scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table, stride_block, stride_slot, stride_cache_head,
    block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    query_start = tl.load(query_starts_ptr + seq).to(tl.int32)
    query_len = tl.load(query_starts_ptr + seq + 1).to(tl.int32) - query_start
    context = tl.load(context_lens_ptr + seq).to(tl.int32)
    first_position = context - query_len  # the cached prefix before this step's queries

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < query_len
    query_positions = first_position + rows
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    q = tl.load(
        q_ptr + (query_start + rows)[:, None] * stride_qt + head * stride_qh + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :], other=0.0,
    )  # fmt: skip

    # Keys up to the tile's last query (causal); with a window, from the first query's window on.
    # A tile past the sequence's queries gets an empty range and stores nothing.
    key_end = tl.minimum(context, first_position + (tile + 1) * BLOCK_M)
    key_end = tl.where(tile * BLOCK_M < query_len, key_end, 0)
    key_start = tl.where(window > 0, tl.maximum(first_position + tile * BLOCK_M - window + 1, 0), 0)
    key_start = (key_start // BLOCK_N) * BLOCK_N

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_table
    for start in range(key_start, key_end, BLOCK_N):
        positions, key_mask, offsets, tile_mask = paged_tile(
            table, start, key_end, cols, col_mask, block_size, stride_block, stride_slot,
            kv_head * stride_cache_head, BLOCK_N,
        )  # fmt: skip
        keys = tl.load(k_cache_ptr + offsets, mask=tile_mask, other=0.0)
        scores = tl.dot(q, tl.trans(keys)) * scale  # [BLOCK_M, BLOCK_N] in float32
        visible = key_mask[None, :] & (positions[None, :] <= query_positions[:, None])
        visible = visible & ((window <= 0) | (positions[None, :] > query_positions[:, None] - window))
        scores = tl.where(visible, scores, float("-inf"))
        running_max, rescale, probs, running_sum = online_softmax_step(running_max, running_sum, scores)
        values = tl.load(v_cache_ptr + offsets, mask=tile_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values)

    out = acc / tl.maximum(running_sum, 1e-30)[:, None]
    tl.store(
        out_ptr + (query_start + rows)[:, None] * stride_ot + head * stride_oh + cols[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :],
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Packed queries q [T, heads, d] of B sequences against their paged contexts; returns [T, heads, d].

    ``query_starts`` [B + 1]: where each sequence's queries start in q (cu_seqlens), T at the end.
    ``context_lens`` [B]: each sequence's length after this step; its queries are its last
    positions, and its keys and values (prefix and fresh) are already in the cache.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype:
        raise ValueError(f"prefill_attention runs fp16 / bf16 with a cache of the same dtype, got {q.dtype}")
    if (
        num_heads % num_kv_heads
        or q.stride(2) != 1
        or not k_cache.is_contiguous()
        or not v_cache.is_contiguous()
    ):
        raise ValueError(
            "prefill_attention needs heads a multiple of the KV heads and contiguous rows and caches"
        )
    out = q.new_empty(num_tokens, num_heads, head_dim)
    num_seqs = query_starts.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid = (num_seqs, triton.cdiv(max_query_len, BLOCK_M), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_starts, context_lens,
        scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_size,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return out
