"""Paged decode attention with flash-decoding's split over the context, in Triton.

Papers: vLLM's PagedAttention (Kwon et al. 2023) for reading keys and values through a block
table; Flash-Decoding (Dao, Haziza, Massa, Sizov 2023) for splitting one query's context into
partitions that run on separate programs, each keeping a running max, sum and weighted value sum
(the online softmax of FlashAttention, Dao et al. 2022), merged by a second small kernel.
Idea: a decode step has one query per sequence, so a kernel per (sequence, KV head) would leave
most of a GPU idle at batch 1; splitting the context into ``partition_size`` slices gives
``batch x kv_heads x partitions`` programs (partitions of 64 tokens, or more past 4096 tokens). The query heads that share a KV head (GQA) are one
program's rows, so each key and value is read once for all of them.

Layout read in place: caches [num_blocks, block_size, kv_heads, d] (``layers/attention.py``),
block tables [B, max_blocks], context lengths [B] (0: a padding row, its output is zero).
The number of partitions follows the block table's width, not the lengths' values, so a CUDA
graph that captured one width replays for every length up to it.

Switch on: automatic for CUDA tensors (``kernels/triton/gpu_ops.py``; ``EFFINFER_TRITON_OPS=0`` off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effinfer.kernels.triton.paged_kv_store import paged_tile

# Context tokens per program: enough partitions that a short context still spreads over a few
# programs per KV head, at most MAX_PARTITIONS so that the merge stays one small program per head.
MIN_PARTITION_SIZE = 64
MAX_PARTITIONS = 64
# A program multiplies [heads of a group, keys, d] at once: keep that product near this many floats.
TILE_ELEMENTS = 8192


@triton.jit
def online_softmax_step(running_max, running_sum, scores):
    """One tile of FlashAttention's online softmax over rows of ``scores`` (-inf: hidden keys):
    (new running max, the factor that rescales what was accumulated, the tile's probabilities,
    new running sum). A row that has seen no visible key keeps max -inf and gets zeros, not NaN."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    probs = tl.exp(scores - shift[:, None])
    return new_max, rescale, probs, running_sum * rescale + tl.sum(probs, axis=1)


@triton.jit
def _partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    max_ptr, sum_ptr, acc_ptr,
    scale, window,
    stride_qb, stride_qh, stride_table, stride_block, stride_slot, stride_cache_head,
    num_heads, num_partitions, block_size,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context = tl.load(context_lens_ptr + seq).to(tl.int32)
    first_visible = tl.where(window > 0, tl.maximum(context - window, 0), 0)
    part_start = tl.maximum(part * PARTITION, first_visible)
    part_end = tl.minimum(part * PARTITION + PARTITION, context)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :], other=0.0,
    ).to(tl.float32) * scale  # fmt: skip

    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_table
    for start in range(part_start, part_end, BLOCK_N):
        positions, key_mask, offsets, tile_mask = paged_tile(
            table, start, part_end, cols, col_mask, block_size, stride_block, stride_slot,
            kv_head * stride_cache_head, BLOCK_N,
        )  # fmt: skip
        keys = tl.load(k_cache_ptr + offsets, mask=tile_mask, other=0.0)
        scores = tl.sum(q[:, None, :] * keys.to(tl.float32)[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_N]
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        running_max, rescale, probs, running_sum = online_softmax_step(running_max, running_sum, scores)
        values = tl.load(v_cache_ptr + offsets, mask=tile_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * values.to(tl.float32)[None, :, :], axis=1)

    out_index = (seq * num_heads + heads) * num_partitions + part
    tl.store(max_ptr + out_index, running_max, mask=row_mask)
    tl.store(sum_ptr + out_index, running_sum, mask=row_mask)
    tl.store(
        acc_ptr + out_index[:, None] * D_PAD + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :]
    )


@triton.jit
def _reduce_kernel(
    max_ptr, sum_ptr, acc_ptr, out_ptr,
    stride_ob, stride_oh, num_heads, num_partitions,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PARTS_PAD: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    parts = tl.arange(0, PARTS_PAD)
    part_mask = parts < num_partitions
    base = (seq * num_heads + head) * num_partitions
    maxes = tl.load(max_ptr + base + parts, mask=part_mask, other=float("-inf"))
    sums = tl.load(sum_ptr + base + parts, mask=part_mask, other=0.0)
    overall = tl.max(maxes, axis=0)
    overall = tl.where(overall == float("-inf"), 0.0, overall)  # an empty context: every weight 0
    weights = tl.where(part_mask, tl.exp(maxes - overall), 0.0)
    total = tl.sum(weights * sums, axis=0)
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    acc = tl.load(
        acc_ptr + (base + parts)[:, None] * D_PAD + cols[None, :],
        mask=part_mask[:, None] & col_mask[None, :], other=0.0,
    )  # fmt: skip
    out = tl.sum(weights[:, None] * acc, axis=0) / tl.maximum(total, 1e-30)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    partition_size: int | None = None,
) -> torch.Tensor:
    """One query per sequence, q [B, heads, d], over its paged context; returns [B, heads, d].

    ``sliding_window`` W: each query sees its last W positions only. ``partition_size``: context
    tokens per program (default: from the block table's width, see ``MIN_PARTITION_SIZE``).
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if (
        num_heads % num_kv_heads
        or q.stride(2) != 1
        or not k_cache.is_contiguous()
        or not v_cache.is_contiguous()
    ):
        raise ValueError(
            "decode_attention needs heads a multiple of the KV heads and contiguous rows and caches"
        )
    group = num_heads // num_kv_heads
    # Tile sides of at least 2: a side of 1 is legal Triton, but the least exercised layout.
    group_pad, d_pad = max(2, triton.next_power_of_2(group)), max(2, triton.next_power_of_2(head_dim))
    block_n = max(1, min(64, triton.next_power_of_2(TILE_ELEMENTS // (group_pad * d_pad) + 1) // 2))
    max_context = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = max(
            MIN_PARTITION_SIZE, triton.next_power_of_2(triton.cdiv(max_context, MAX_PARTITIONS))
        )
    num_partitions = max(1, triton.cdiv(max_context, partition_size))
    out = q.new_empty(batch, num_heads, head_dim)
    if batch == 0:
        return out
    maxes = torch.empty(batch, num_heads, num_partitions, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    acc = torch.empty(batch, num_heads, num_partitions, d_pad, dtype=torch.float32, device=q.device)
    _partition_kernel[(batch, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, maxes, sums, acc,
        scale, sliding_window or 0,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2),
        num_heads, num_partitions, block_size,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_N=block_n,
        PARTITION=partition_size,
    )  # fmt: skip
    _reduce_kernel[(batch, num_heads)](
        maxes, sums, acc, out, out.stride(0), out.stride(1), num_heads, num_partitions,
        HEAD_DIM=head_dim, D_PAD=d_pad, PARTS_PAD=max(2, triton.next_power_of_2(num_partitions)),
    )  # fmt: skip
    return out
