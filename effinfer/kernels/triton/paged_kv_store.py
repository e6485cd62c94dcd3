"""Writing a step's keys and values into their paged-cache slots, in one Triton kernel.

Paper: vLLM's PagedAttention (Kwon et al. 2023), its ``reshape_and_cache``. Idea: each token's
K and V rows go to ``slot_mapping[t]`` of the cache [num_blocks, block_size, kv_heads, d]; a
negative slot writes nothing, which lets a CUDA graph replay a batch padded to its bucket
(``engine/cuda_graphs.py``) without touching any real block. Keys and values may be strided
views of the qkv projection's output.

Switch on: automatic for CUDA tensors (``kernels/triton/gpu_ops.py``; ``EFFINFER_TRITON_OPS=0`` off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def cache_row_offsets(table_ptr, positions, mask, block_size, stride_block, stride_slot):
    """Element offsets of a sequence's ``positions`` in the paged cache, found through its block
    table row ``table_ptr`` (masked positions read block 0); add the KV head's offset and the column."""
    blocks = tl.load(table_ptr + positions // block_size, mask=mask, other=0).to(tl.int64)
    return blocks * stride_block + (positions % block_size) * stride_slot


@triton.jit
def paged_tile(
    table_ptr, start, end, cols, col_mask, block_size, stride_block, stride_slot, head_offset,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Keys ``start``..``start + BLOCK_N`` of one KV head (those before ``end``) in the paged cache:
    (positions, which of them exist, element offsets [BLOCK_N, len(cols)], the tile's load mask)."""
    positions = start + tl.arange(0, BLOCK_N)
    key_mask = positions < end
    rows = cache_row_offsets(table_ptr, positions, key_mask, block_size, stride_block, stride_slot)
    return (
        positions,
        key_mask,
        rows[:, None] + head_offset + cols[None, :],
        key_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _store_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_slot, stride_cache_head,
    num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, BLOCK_D)
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)  # a negative slot: a padding row
    mask = (heads[:, None] < heads_to_write) & (cols[None, :] < HEAD_DIM)
    dest = slot * stride_slot + heads[:, None] * stride_cache_head + cols[None, :]
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + cols[None, :], mask=mask)
    tl.store(k_cache_ptr + dest, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + cols[None, :], mask=mask)
    tl.store(v_cache_ptr + dest, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, kv_heads, d] into caches [num_blocks, block_size, kv_heads, d] at ``slot_mapping`` [T]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("store_kv needs contiguous heads and contiguous caches")
    if num_tokens == 0:
        return
    _store_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_HEADS=max(2, triton.next_power_of_2(num_kv_heads)),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
