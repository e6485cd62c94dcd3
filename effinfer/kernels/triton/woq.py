"""GPU weight-only int4 / int8 matrix multiply (W4A16, W8A16) in Triton.

Paper: none single; the scheme is GPTQ/AWQ-style weight-only quantization (Frantar et al. 2022,
Lin et al. 2023) run the way GPTQ-Triton and vLLM's Triton/Marlin-style kernels do. Idea: decoding
is memory-bound, so streaming 0.5 (int4) or 1 (int8) byte per weight instead of bf16's 2 makes
it up to 4x (2x) faster, provided the codes become tensor-core operands in registers, never a
dense weight in memory. Each K-block lies inside one quantization group, so the kernel
multiplies exact integer weights ``q - zero`` (exact in bf16/fp16) by the activations on tensor
cores and applies the group scale once per block to the fp32 partial sums.

Layout (made once, in ``prepare``): codes transposed to [K, N] so loads are coalesced along the
output dimension; int4 (and 2/3-bit) codes packed 8 per int32 along K, int8 codes one byte each.
GPTQ act-order (``g_idx``) is handled by permuting the weight's columns so that every group is
contiguous, and permuting ``x`` the same way per call; groups that are not a multiple of 16
columns are zero-padded to one. K is padded to a whole number of K-blocks.

One row (batch-1 decode, ``GEMV_MAX_M``): a CUDA-core matrix-vector kernel (a tensor-core tile
would waste 15 of its 16 rows). Few rows: tensor-core tiles. Both split K over the grid so that
even a 2048x2048 weight fills every SM, then a small reduction kernel adds the partial sums and
the bias. Many rows (``DEQUANT_MIN_M`` and up):
the weight is dequantized to the activation dtype once per call and multiplied by cuBLAS.

NF4 / FP4 (QLoRA) weights whose absmax blocks tile the rows run the same kernel: the block is
the group, the absmax its scale, and the 4-bit codes index a 16-entry table of levels instead of
standing for ``q - zero``. ``LEVEL_LOOKUP`` picks, per kernel, how a code becomes its level: a
gather from the table (served by L1), or a tree of 15 selects between the 16 levels in registers.

Switch on: automatic for quantized Linear layers on CUDA (``kernels/quant_linear.py``) when
Triton is importable; ``prepare`` returns None (the layer then runs a dequantized weight) for
activation dtypes other than bf16 / fp16 / fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from effinfer.quant.codebook import CodebookWeight, row_blocks
from effinfer.quant.integer import QuantizedWeight
from effinfer.quant.registry import Kernel, register_kernel

logger = logging.getLogger(__name__)

# From this many rows on, dequantize-then-cuBLAS instead of the fused kernel (benchmarks/gpu_quant.py
# measures both: on an H200 dequantizing won at 64 rows on every shape, by 1.6-2.3x; at 16 rows
# it won on some shapes and lost on others; docs/results/gpu_quant_h200.md).
DEQUANT_MIN_M = 64
# The unpacking of int4 words: "reshape" loads each word once and splits it into 8 rows in
# registers; "gather" loads each word 8 times (once per row, served by L1), as GPTQ-Triton does.
# If "reshape" fails to compile on some Triton version, the kernel falls back to "gather".
UNPACK = "reshape"
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# NF4 / FP4, per kernel: "gather" (a load per code from the 16-entry table, served by L1) or
# "select" (a 4-level tree of selects between the levels in registers). Measured on an H200
# (docs/results/gpu_quant_h200.md, 4096x11008): GEMV 61 us gathering vs 100 selecting; tensor-core
# tiles 83 vs 92 at one row and 160 vs 523 at 64 (the gather's registers spill there). ``apply``
# sends NF4 to the GEMV or to dequantizing, so the tiles' lookup matters only where they are
# called directly; dequantizing gathers (34 vs 44 us for 11264x2048 in a one-off check,
# docs/results/gpu_nf4_lookup_h200.md).
LEVEL_LOOKUP = {"gemv": "gather", "tile": "select", "dequantize": "gather"}
# NF4 / FP4 from this many rows on: dequantize-then-cuBLAS. From two rows it matched or beat the
# tiles on every shape; the GEMV was still ahead on the 7B-sized layers at two rows (58 vs 69 us)
# but behind on TinyLlama's (17 vs 12) and on every layer from four rows.
CODEBOOK_DEQUANT_MIN_M = 2
# The CUDA-core one-row kernel (``gemv``) instead of tensor-core tiles: for a single row, always
# for NF4 / FP4, and for integer codes on layers of at least ``GEMV_MIN_WEIGHTS`` weights (int8 on
# 11008x4096: 26.7 vs 33.7 us; on TinyLlama's 2048x2048 o_proj the tiles won, 8.5 vs 9.9).
GEMV_MAX_M = 1
GEMV_MIN_WEIGHTS = 1 << 23
_LOOKUP_CODES = {"gather": 1, "select": 2}  # the kernels' CODEBOOK argument; 0 = integer codes


@dataclass
class TritonWoqState:
    codes: torch.Tensor  # int32 [Kp // 8, N] (packed nibbles) or uint8 [Kp, N]
    scales: torch.Tensor  # float32 [groups, N]
    zeros: torch.Tensor  # int32 [groups, N] (a placeholder [1] with a table)
    bias: torch.Tensor | None  # [N], in the activation dtype
    perm: torch.Tensor | None  # int64 [K']: the input column feeding kernel column k (in_features = a zero)
    zero_column: bool  # perm reads column ``in_features``: append a zero column to x first
    storage_bits: int  # 4 (codes of 2, 3 or 4 bits, one nibble each) or 8
    group: int  # kernel columns per group (a multiple of every K-block used)
    in_features: int  # K of the layer
    kernel_k: int  # K' = columns of x after the permutation (== in_features without act-order padding)
    padded_k: int  # Kp, the codes' K (a multiple of ``max_block_k``)
    max_block_k: int  # largest K-block that divides ``group``
    out_features: int
    dtype: torch.dtype
    num_sms: int
    table: torch.Tensor | None = None  # float32 [16]: the levels 4-bit codes index (NF4 / FP4)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # K-slices computed by separate programs (their fp32 partial sums are added after)
    num_warps: int = 4
    num_stages: int = 3


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _load_codes(
    codes_ptr, kb, offs_n, n_mask, N,
    STORAGE_BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK_RESHAPE: tl.constexpr,
):  # fmt: skip
    """int32 codes [BLOCK_K, BLOCK_N] of K-block ``kb``."""
    if STORAGE_BITS == 4:
        if UNPACK_RESHAPE:
            offs_w = kb * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
            words = tl.load(codes_ptr + offs_w[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            shifts = tl.arange(0, 8) * 4
            # [words, 8, N] -> [K, N]: row k of the block is nibble k % 8 of word k // 8.
            codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF
            codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        else:
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            words = tl.load(
                codes_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=n_mask[None, :], other=0
            )
            codes = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
    else:
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        codes = tl.load(codes_ptr + offs_k[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        codes = codes.to(tl.int32)
    return codes


@triton.jit
def _levels(codes, table_ptr, LOOKUP: tl.constexpr):
    """``table[codes]`` (float32) for 4-bit codes: a gather (LOOKUP 1) or a tree of selects (LOOKUP 2)."""
    if LOOKUP == 1:
        return tl.load(table_ptr + codes)
    b0 = (codes & 1) != 0
    b1 = (codes & 2) != 0
    b2 = (codes & 4) != 0
    b3 = (codes & 8) != 0
    # Pairs that differ in bit 0, then in bit 1, 2, 3.
    p0 = tl.where(b0, tl.load(table_ptr + 1), tl.load(table_ptr + 0))
    p1 = tl.where(b0, tl.load(table_ptr + 3), tl.load(table_ptr + 2))
    p2 = tl.where(b0, tl.load(table_ptr + 5), tl.load(table_ptr + 4))
    p3 = tl.where(b0, tl.load(table_ptr + 7), tl.load(table_ptr + 6))
    p4 = tl.where(b0, tl.load(table_ptr + 9), tl.load(table_ptr + 8))
    p5 = tl.where(b0, tl.load(table_ptr + 11), tl.load(table_ptr + 10))
    p6 = tl.where(b0, tl.load(table_ptr + 13), tl.load(table_ptr + 12))
    p7 = tl.where(b0, tl.load(table_ptr + 15), tl.load(table_ptr + 14))
    q0 = tl.where(b1, p1, p0)
    q1 = tl.where(b1, p3, p2)
    q2 = tl.where(b1, p5, p4)
    q3 = tl.where(b1, p7, p6)
    r0 = tl.where(b2, q1, q0)
    r1 = tl.where(b2, q3, q2)
    return tl.where(b3, r1, r0)


# Sizes that only feed masks and loop counts are not specialized on (divisible by 16, equal to 1),
# so that odd layer widths and row counts do not each compile their own kernel.
@triton.jit(do_not_specialize=["M", "K", "group", "blocks_per_split"])
def _woq_matmul_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, group, blocks_per_split,
    STORAGE_BITS: tl.constexpr, CODEBOOK: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr,
    UNPACK_RESHAPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, n] = sum_k x[m, k] * (q[k, n] - zero[g(k), n]) * scale[g(k), n] over this program's K-slice.

    ``PARTIAL``: write fp32 partial sums to ``out[pid_k, m, n]`` (split-K), else the final
    result (plus bias) in ``out``'s dtype. Every K-block lies in one group (``group`` is a
    multiple of ``BLOCK_K``), so the scale multiplies the block's dot product once.
    ``CODEBOOK`` (1 or 2, see ``_levels``): the codes index ``table`` and there is no zero point.
    """
    pid_m = tl.program_id(0)  # fastest: programs that share a weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    kb_start = pid_k * blocks_per_split  # blocks_per_split divides the number of K-blocks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, blocks_per_split):
        kb = kb_start + i
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        # Columns past K (padding) read as 0, so padded codes contribute nothing.
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        codes = _load_codes(codes_ptr, kb, offs_n, n_mask, N, STORAGE_BITS, BLOCK_K, BLOCK_N, UNPACK_RESHAPE)
        g = (kb * BLOCK_K) // group
        scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0)
        if CODEBOOK != 0:
            w = _levels(codes, table_ptr, CODEBOOK).to(x.dtype)
        else:
            zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0)
            # q - zero is an integer in [-255, 255]: exact in bf16 / fp16.
            w = (codes - zero[None, :]).to(x.dtype)
        if IEEE:
            part = tl.dot(x, w, input_precision="ieee")
        else:
            part = tl.dot(x, w)
        acc += part * scale[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["K", "group", "blocks_per_split"])
def _woq_gemv_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, table_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, group, blocks_per_split,
    STORAGE_BITS: tl.constexpr, CODEBOOK: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    UNPACK_RESHAPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One row of x times the weight, on CUDA cores: the matrix-vector product of batch-1 decode.

    A dot-product tile would waste 15 of its 16 rows on a single token; instead every thread
    multiplies its codes by x elementwise into an fp32 [BLOCK_K, BLOCK_N] accumulator, which is
    summed over K once at the end. Grid: (N tiles, K-slices, rows of x); ``PARTIAL`` as in
    ``_woq_matmul_kernel``.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for i in range(0, blocks_per_split):
        kb = pid_k * blocks_per_split + i
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        codes = _load_codes(codes_ptr, kb, offs_n, n_mask, N, STORAGE_BITS, BLOCK_K, BLOCK_N, UNPACK_RESHAPE)
        g = (kb * BLOCK_K) // group
        scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0)
        if CODEBOOK != 0:
            w = _levels(codes, table_ptr, CODEBOOK)
        else:
            zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0)
            w = (codes - zero[None, :]).to(tl.float32)
        acc += x[:, None] * (w * scale[None, :])
    y = tl.sum(acc, axis=0)
    if PARTIAL:
        tl.store(out_ptr + (pid_k * M + row) * N + offs_n, y, mask=n_mask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=["total", "N", "splits"])
def _splitk_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, total, N, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """out = sum over splits of part[s] (+ bias), cast to out's dtype; ``total`` = M * N."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["K", "group"])
def _dequantize_kernel(
    codes_ptr, scales_ptr, zeros_ptr, table_ptr, out_ptr, N, K, group,
    STORAGE_BITS: tl.constexpr, CODEBOOK: tl.constexpr, UNPACK_RESHAPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n] (or table[q] * scale) for k < K (out is [K, N])."""
    kb = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    codes = _load_codes(codes_ptr, kb, offs_n, n_mask, N, STORAGE_BITS, BLOCK_K, BLOCK_N, UNPACK_RESHAPE)
    g = (kb * BLOCK_K) // group
    scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0)
    if CODEBOOK != 0:
        w = _levels(codes, table_ptr, CODEBOOK) * scale[None, :]
    else:
        zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0)
        w = (codes - zero[None, :]).to(tl.float32) * scale[None, :]
    mask = (offs_k[:, None] < K) & n_mask[None, :]
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Packing (once, at load)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _largest_block_dividing(group: int) -> int:
    for block in (128, 64, 32, 16):
        if group % block == 0:
            return block
    raise AssertionError("group sizes are padded to a multiple of 16")


def column_layout(weight: QuantizedWeight) -> tuple[torch.Tensor | None, int | None, int]:
    """How the kernel orders the input columns: (perm, group, kernel_k).

    ``perm[j]`` is the input column that kernel column j reads (``in_features`` means a zero
    column), None for the natural order; ``group`` is the kernel's columns per group (None: one
    group for the whole row). Groups must be contiguous runs of equal length (the last may be
    shorter), a multiple of 16 columns, for a K-block never to straddle two groups; act-order
    groups are made contiguous by sorting columns by group, and groups of other sizes are
    zero-padded to a multiple of 16.
    """
    in_features = weight.in_features
    num_groups = weight.num_groups
    if num_groups <= 1:
        return None, None, in_features
    group_of = weight.group_index().cpu()
    order = torch.argsort(group_of, stable=True)
    counts = torch.bincount(group_of, minlength=num_groups).tolist()
    size = counts[0]
    if size % 16 == 0 and all(c == size for c in counts[:-1]) and 0 < counts[-1] <= size:
        natural = torch.equal(order, torch.arange(in_features))
        return (None if natural else order), size, in_features
    padded = _round_up(max(counts), 16)
    perm = torch.full((num_groups * padded,), in_features, dtype=torch.long)
    start = 0
    for g, count in enumerate(counts):
        perm[g * padded : g * padded + count] = order[start : start + count]
        start += count
    return perm, padded, num_groups * padded


def _pack_nibbles(codes_kn: torch.Tensor) -> torch.Tensor:
    """uint8 codes [Kp, N] (each < 16, Kp % 8 == 0) -> int32 [Kp // 8, N]; row k is nibble k % 8 of word k // 8."""
    kp, n = codes_kn.shape
    nibbles = codes_kn.to(torch.int64).reshape(kp // 8, 8, n)
    shifts = (torch.arange(8, device=codes_kn.device, dtype=torch.int64) * 4).view(1, 8, 1)
    words = (nibbles << shifts).sum(dim=1)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same bits as a signed int32
    return words.to(torch.int32).contiguous()


def prepare(weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> TritonWoqState | None:
    """Repack ``weight`` for the kernel, or None where it does not apply (the layer then runs dequantized)."""
    if dtype not in _SUPPORTED_DTYPES or weight.bits not in (2, 3, 4, 8):
        return None
    device = weight.qweight.device
    out_features, in_features = weight.qweight.shape
    perm, group, kernel_k = column_layout(weight)
    if group is None:  # one group: any K-block works; pad K to a multiple of the largest
        padded_k = _round_up(kernel_k, 128)
        group = padded_k
    else:
        padded_k = _round_up(kernel_k, _largest_block_dividing(group))
    max_block_k = _largest_block_dividing(group)

    codes = weight.qweight
    if perm is not None:
        codes = torch.cat([codes, codes.new_zeros(out_features, 1)], dim=1)[:, perm.to(device)]
    codes_kn = torch.zeros(padded_k, out_features, dtype=torch.uint8, device=device)
    codes_kn[:kernel_k] = codes.t()
    storage_bits = 8 if weight.bits == 8 else 4
    packed = _pack_nibbles(codes_kn) if storage_bits == 4 else codes_kn.contiguous()

    # Per kernel group, the scale and zero of the original group its columns came from.
    kernel_groups = -(-padded_k // group)
    scales = torch.zeros(kernel_groups, out_features, dtype=torch.float32, device=device)
    zeros = torch.zeros(kernel_groups, out_features, dtype=torch.int32, device=device)
    if perm is None:
        source_group = torch.arange(weight.num_groups)
    else:
        group_of = torch.cat([weight.group_index().cpu(), torch.tensor([-1])])[perm]
        source_group = group_of[::group]  # the first column of every kernel group
        if (source_group < 0).any():  # a group with no column at all (an unused g_idx value)
            source_group = source_group.clamp(min=0)
    used = source_group.numel()
    scales[:used] = weight.scales.float().t()[source_group.to(device)]
    zeros[:used] = weight.zeros.to(torch.int32).t()[source_group.to(device)]

    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return TritonWoqState(
        codes=packed,
        scales=scales.contiguous(),
        zeros=zeros.contiguous(),
        bias=bias.detach().to(dtype).contiguous() if bias is not None else None,
        perm=perm.to(device) if perm is not None else None,
        zero_column=perm is not None and bool((perm >= in_features).any()),
        storage_bits=storage_bits,
        group=group,
        in_features=in_features,
        kernel_k=kernel_k,
        padded_k=padded_k,
        max_block_k=max_block_k,
        out_features=out_features,
        dtype=dtype,
        num_sms=num_sms,
    )


def prepare_codebook(weight, bias: torch.Tensor | None, dtype: torch.dtype) -> TritonWoqState | None:
    """Repack an NF4 / FP4 ``CodebookWeight`` whose blocks tile its rows; None otherwise (chunked decode then)."""
    grouped = row_blocks(weight)
    state = prepare(grouped, bias, dtype) if grouped is not None else None
    if state is not None:
        state.table = weight.code.float().to(state.codes.device).contiguous()
        state.zeros = state.zeros.new_zeros(1)  # never read with a table: no [groups, N] of zeros
    return state


# ----------------------------------------------------------------------------------------------
# Running


def choose_config(state: TritonWoqState, m: int) -> KernelConfig:
    """Tiles by row count: one 16-row tile for decode, larger ones for prefill; split-K fills the SMs."""
    if m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = (32 if m <= 32 else 64), 64, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 4, 3
    block_k = min(block_k, state.max_block_k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(state.out_features, block_n)
    k_blocks = state.padded_k // block_k
    target = 2 * state.num_sms if m <= 16 else state.num_sms
    split = 1
    if tiles < target:
        # Keep at least two K-blocks per program so each one still streams some weight.
        split = max(1, min(triton.cdiv(target, tiles), k_blocks // 2))
    return KernelConfig(block_m, block_n, block_k, split, warps, stages)


def _pointer_or_scales(tensor: torch.Tensor | None, state: TritonWoqState) -> torch.Tensor:
    """``tensor``, or a valid stand-in pointer where the kernel's flags say it is never read."""
    return tensor if tensor is not None else state.scales


def _codebook_mode(state: TritonWoqState, kernel: str) -> int:
    """The kernels' CODEBOOK argument: 0 for integer codes, else ``kernel``'s level lookup."""
    return 0 if state.table is None else _LOOKUP_CODES[LEVEL_LOOKUP[kernel]]


_unpack_fallback: set[tuple] = set()  # configs where the "reshape" unpacking failed to compile


def _prepare_x(state: TritonWoqState, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, state.in_features)
    if x2.dtype != state.dtype:
        x2 = x2.to(state.dtype)
    if state.perm is not None:
        if state.zero_column:
            x2 = torch.nn.functional.pad(x2, (0, 1))
        x2 = x2.index_select(1, state.perm)
    return x2.contiguous()


def _launch_matmul(
    state: TritonWoqState, x2: torch.Tensor, out: torch.Tensor, cfg: KernelConfig, unpack: str
):
    m, n = x2.shape[0], state.out_features
    per_split, splits = _split_evenly(state.padded_k // cfg.block_k, cfg.split_k)
    partial = splits > 1
    target = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device) if partial else out
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), splits)
    bias, table = _pointer_or_scales(state.bias, state), _pointer_or_scales(state.table, state)
    _woq_matmul_kernel[grid](
        x2, state.codes, state.scales, state.zeros, table, bias, target,
        m, n, state.kernel_k, x2.stride(0), state.group, per_split,
        STORAGE_BITS=state.storage_bits, CODEBOOK=_codebook_mode(state, "tile"), HAS_BIAS=state.bias is not None, PARTIAL=partial,
        IEEE=x2.dtype == torch.float32, UNPACK_RESHAPE=unpack == "reshape",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if partial:
        _reduce_splits(state, target, out)


def _with_unpack_fallback(state: TritonWoqState, key: tuple, launch) -> None:
    """Run ``launch(unpack)`` with ``UNPACK``; if that variant fails to compile, use "gather" from then on."""
    unpack = UNPACK if state.storage_bits == 4 else "gather"
    if unpack == "reshape" and key not in _unpack_fallback:
        try:
            launch("reshape")
            return
        except Exception as e:  # compile errors, out of shared memory, ...
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            logger.warning("int4 'reshape' unpacking failed (%s); using 'gather'", str(e).splitlines()[0])
            _unpack_fallback.add(key)
    launch("gather")


def _split_evenly(k_blocks: int, split_k: int) -> tuple[int, int]:
    """(K-blocks per program, programs): the fewest blocks per program that divide them among <= split_k."""
    per_split = next(p for p in range(triton.cdiv(k_blocks, split_k), k_blocks + 1) if k_blocks % p == 0)
    return per_split, k_blocks // per_split


def _reduce_splits(state: TritonWoqState, partial: torch.Tensor, out: torch.Tensor) -> None:
    splits, m, n = partial.shape
    total, block = m * n, 1024
    bias = _pointer_or_scales(state.bias, state)
    _splitk_reduce_kernel[(triton.cdiv(total, block),)](
        partial, bias, out, total, n, splits, HAS_BIAS=state.bias is not None, BLOCK=block
    )


def gemv(state: TritonWoqState, x: torch.Tensor, unpack: str | None = None) -> torch.Tensor:
    """y = x @ W^T + b on CUDA cores, one program row per row of x (meant for one or a few rows)."""
    x2 = _prepare_x(state, x)
    m, n = x2.shape[0], state.out_features
    out = torch.empty(m, n, dtype=state.dtype, device=x2.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    block_n, block_k = 128, min(64, state.max_block_k)
    tiles = triton.cdiv(n, block_n)
    k_blocks = state.padded_k // block_k
    # Enough programs for every SM to have several loads in flight, each still streaming 2+ blocks.
    per_split, splits = _split_evenly(
        k_blocks, max(1, min(triton.cdiv(4 * state.num_sms, tiles), k_blocks // 2))
    )
    partial = splits > 1
    target = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device) if partial else out
    bias, table = _pointer_or_scales(state.bias, state), _pointer_or_scales(state.table, state)
    codebook = _codebook_mode(state, "gemv")

    def launch(u: str) -> None:
        _woq_gemv_kernel[(tiles, splits, m)](
            x2, state.codes, state.scales, state.zeros, table, bias, target,
            m, n, state.kernel_k, x2.stride(0), state.group, per_split,
            STORAGE_BITS=state.storage_bits, CODEBOOK=codebook, HAS_BIAS=state.bias is not None,
            PARTIAL=partial, UNPACK_RESHAPE=u == "reshape", BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip

    if unpack is not None:
        launch(unpack)
    else:
        key = ("gemv", block_k, state.storage_bits, codebook, x2.dtype, state.bias is not None, partial)
        _with_unpack_fallback(state, key, launch)
    if partial:
        _reduce_splits(state, target, out)
    return out.reshape(*x.shape[:-1], n)


def fused_matmul(
    state: TritonWoqState, x: torch.Tensor, config: KernelConfig | None = None, unpack: str | None = None
) -> torch.Tensor:
    """y = x @ W^T + b with the fused kernel (``config`` and ``unpack`` default to the tuned choice)."""
    x2 = _prepare_x(state, x)
    m = x2.shape[0]
    out = torch.empty(m, state.out_features, dtype=state.dtype, device=x2.device)
    if m > 0:
        cfg = config or choose_config(state, m)
        if unpack is not None:
            _launch_matmul(state, x2, out, cfg, unpack)
        else:
            key = (
                "matmul",
                cfg,
                state.storage_bits,
                _codebook_mode(state, "tile"),
                x2.dtype,
                state.bias is not None,
            )
            _with_unpack_fallback(state, key, lambda u: _launch_matmul(state, x2, out, cfg, u))
    return out.reshape(*x.shape[:-1], state.out_features)


def dequantize(state: TritonWoqState, unpack: str | None = None) -> torch.Tensor:
    """The weight as [K', N] in the activation dtype (kernel column order), for cuBLAS."""
    block_k, block_n = min(64, state.max_block_k), 64
    wt = torch.empty(state.kernel_k, state.out_features, dtype=state.dtype, device=state.codes.device)
    grid = (triton.cdiv(state.kernel_k, block_k), triton.cdiv(state.out_features, block_n))

    table = _pointer_or_scales(state.table, state)

    def launch(u: str) -> None:
        _dequantize_kernel[grid](
            state.codes, state.scales, state.zeros, table, wt, state.out_features, state.kernel_k,
            state.group, STORAGE_BITS=state.storage_bits, CODEBOOK=_codebook_mode(state, "dequantize"), UNPACK_RESHAPE=u == "reshape", BLOCK_K=block_k, BLOCK_N=block_n,
        )  # fmt: skip

    if unpack is not None:
        launch(unpack)
    else:
        _with_unpack_fallback(
            state,
            ("dequantize", state.storage_bits, _codebook_mode(state, "dequantize"), state.dtype),
            launch,
        )
    return wt


def dequant_matmul(state: TritonWoqState, x: torch.Tensor, unpack: str | None = None) -> torch.Tensor:
    """y = x @ W^T + b by dequantizing W once and calling cuBLAS (for many rows)."""
    x2 = _prepare_x(state, x)
    wt = dequantize(state, unpack)
    y = torch.addmm(state.bias, x2, wt) if state.bias is not None else x2 @ wt
    return y.reshape(*x.shape[:-1], state.out_features)


def apply(state: TritonWoqState, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // state.in_features
    if rows >= (DEQUANT_MIN_M if state.table is None else CODEBOOK_DEQUANT_MIN_M):
        return dequant_matmul(state, x)
    if rows <= GEMV_MAX_M and (
        state.table is not None or state.out_features * state.in_features >= GEMV_MIN_WEIGHTS
    ):
        return gemv(state, x)
    return fused_matmul(state, x)


register_kernel(
    Kernel("triton-woq", QuantizedWeight, "cuda", (None,), lambda w, b, a, dt: prepare(w, b, dt), apply)
)
register_kernel(
    Kernel(
        "triton-woq", CodebookWeight, "cuda", (None,), lambda w, b, a, dt: prepare_codebook(w, b, dt), apply
    )
)
