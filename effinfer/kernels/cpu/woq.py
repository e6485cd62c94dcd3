"""CPU weight-only int8 / int4 / NF4 matrix multiply (AVX512-BF16 for decode, AMX-BF16 for batches).

Paper: none single; the scheme is GPTQ/AWQ-style weight-only quantization (Frantar et al. 2022,
Lin et al. 2023) executed the way llama.cpp and IPEX's WOQ kernels do on CPU. Idea: decoding
streams every weight once per token, so reading 1 (int8) or 0.5 (int4) bytes per weight instead
of bf16's 2 makes it up to 2-4x faster, provided the codes are turned into arithmetic in
registers without ever writing a dense weight back to memory. The codes convert to bf16
exactly; the group scale and zero point are applied once per group to fp32 partial sums
(``y = s * (sum q*x - zero * sum x)``). int4 decode uses AVX512-BF16 dot products with the
codes in registers; everything else converts codes chunk by chunk into an L1-resident ring and
multiplies on AMX tiles. NF4 / FP4 weights (QLoRA) whose absmax blocks tile the rows run the
same kernel with a 16-entry table of bf16 levels in place of the integer conversion (one vpermw
per 32 codes) and the absmax as group scale. The kernel is C++ (``woq_kernels.cpp``),
JIT-compiled on first use and cached by torch.utils.cpp_extension (~20 s the first time).

Switch on: automatic for quantized Linear layers on CPUs with AVX512-BF16 and AMX-BF16 (Sapphire
Rapids and later); elsewhere, or if the build fails, ``prepare`` returns None and the layer runs a
dequantized bf16 weight. ``EFFINFER_CPU_WOQ=0`` disables the kernel.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from effinfer.kernels.cpu import build
from effinfer.quant.affine import AffineGroupWeight
from effinfer.quant.codebook import CodebookWeight, row_blocks
from effinfer.quant.integer import QuantizedWeight
from effinfer.quant.registry import Kernel, register_kernel

SOURCE = Path(__file__).with_name("woq_kernels.cpp")
BLOCK_N = 16  # output rows per packed block (the kernel's register width in fp32)
CHUNK = 32  # groups are padded to multiples of this many input columns (one AMX K-step)
REQUIRED_CPU_FLAGS = (
    build.AVX512_BF16_CPU_FLAGS + ("avx512_fp16", "avx512_vnni", "avx512vbmi", "bmi2") + build.AMX_CPU_FLAGS
)
COMPILE_FLAGS = (
    build.AVX512_BF16_FLAGS + ["-mavx512fp16", "-mavx512vnni", "-mavx512vbmi", "-mbmi2"] + build.AMX_FLAGS
)
# Rows of x from which the AMX path beats register-blocked AVX512-BF16, measured on Sapphire
# Rapids: for int8 always (its 32-code conversion costs more than a tile product), for int4 from 2,
# for NF4 / FP4 ("table") from 3 (2048->11264: AVX512 0.67 vs AMX 0.72 ms at 2 rows, 0.92 vs 0.72 at 3).
AMX_MIN_ROWS = {8: 1, 4: 2, 5: 2, 6: 2, "table": 3}
# Rows of x up to which GGUF blocks run the VNNI path with x quantized to int8 per 32 columns
# (llama.cpp's way: twice the products per instruction of bf16, and int8 codes need no conversion).
# Only for bf16 outputs; ``EFFINFER_WOQ_INT8_ACTIVATIONS=0`` keeps bf16 activations everywhere.
VNNI_MAX_ROWS = {8: 6, 4: 4, 5: 4, 6: 4}  # measured: VNNI beats AMX up to here (Q4_K 4 rows: 0.17 vs 0.30 ms)
# Rows of bf16 x from which integer codes run the panel GEMM (``BoundWeight.prefill``): each panel
# of codes is dequantized once per call into an L2-resident buffer that all rows multiply against,
# where the fused AMX path re-converts the codes for every 64 rows. Measured on Sapphire Rapids
# (Qwen2.5-1.5B Q4_K_M, 1536 -> 17920): 64 rows 3.1 vs 4.8 ms, 512 rows 16 vs 25 ms for
# dequantizing to bf16 in memory and calling oneDNN.
PANEL_MIN_ROWS = 32
INT8_ACTIVATIONS = os.environ.get("EFFINFER_WOQ_INT8_ACTIVATIONS", "1") != "0"


@functools.cache
def extension() -> Any | None:
    """The compiled kernel module, or None (with one warning) where it cannot run."""
    return build.load(
        "effinfer_woq", SOURCE, COMPILE_FLAGS, REQUIRED_CPU_FLAGS,
        "quantized layers run dequantized (NF4 / FP4: decoded chunk by chunk)",
        switch="EFFINFER_CPU_WOQ", needs_amx=True,
    )  # fmt: skip


@dataclass
class WoqData:
    codes: torch.Tensor  # uint8, blocked layout described in woq_kernels.cpp
    scales: torch.Tensor  # float32 [blocks, groups, 16]
    zscales: torch.Tensor  # float32 [blocks, groups, 16]: (zero + code offset) * scale
    chunks: torch.Tensor  # int32 [groups + 1]: first 32-column chunk of each (padded) group
    bias: torch.Tensor | None  # float32 [out]
    bits: int
    out_features: int
    in_features: int
    padded_in: int
    col_index: torch.Tensor | None  # int64 [padded_in]: source column of x (in_features = a zero)
    table: torch.Tensor | None = None  # int16 [32]: bf16 bits of the 16 levels the codes index (NF4 / FP4)
    table_lo: torch.Tensor | None = None  # the same for level - bf16(level), for float32 activations
    group_cols: int = CHUNK  # columns per unit of ``chunks``: 32, or 16 for groups of 16
    # GGUF blocks: (d, sc, dmin, mn, zc) in place of scales / zscales, see ``pack_two_level``.
    two_level: list[torch.Tensor] | None = None
    groups_per_super: int = 1
    # Decode with x rounded to int8 (GGUF blocks, whose format is made for it: llama.cpp multiplies
    # them by Q8 activations). Weight-only schemes (RTN / GPTQ / AWQ: W4A16, W8A16) keep bf16 x.
    int8_activations: bool = False

    bound: Any = None  # the extension's BoundWeight for bf16 calls, made on first use

    def nbytes(self) -> int:
        """Bytes the kernel reads per call for the weight (codes and scales, not the bias)."""
        tensors = [self.codes, self.scales, self.zscales, *(self.two_level or [])]
        return sum(t.numel() * t.element_size() for t in tensors)


def column_layout(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each input column goes: groups made contiguous (act-order) and padded to 32 columns.

    Returns ``col_index`` [padded_in] (the source column of each packed column, ``in_features``
    for padding) and ``chunks`` [groups + 1] (the first 32-column chunk of each group).
    """
    k = weight.in_features
    groups = weight.group_index().cpu()
    num_groups = weight.num_groups
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=num_groups)
    padded_chunks = (counts + CHUNK - 1) // CHUNK
    chunks = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(padded_chunks, 0)])
    group_start = chunks[:-1] * CHUNK
    first_sorted = torch.cumsum(counts, 0) - counts  # where each group begins in ``order``
    sorted_groups = groups[order]
    dest = group_start[sorted_groups] + torch.arange(k) - first_sorted[sorted_groups]
    col_index = torch.full((int(chunks[-1]) * CHUNK,), k, dtype=torch.long)
    col_index[dest] = order
    return col_index, chunks.to(torch.int32)


def _blocked(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad [out, groups] to whole 16-row blocks and reorder to [blocks, groups, 16]."""
    t = F.pad(t, (0, 0, 0, rows - t.shape[0]))
    return t.reshape(rows // BLOCK_N, BLOCK_N, -1).transpose(1, 2).contiguous()


def _bit_masks(halves: torch.Tensor, bit: int) -> torch.Tensor:
    """uint8 [blocks, octets, 2, 64] codes -> [blocks, octets, 16]: bit ``bit`` of each half's 64
    codes as a little-endian 64-bit mask, half 0's then half 1's (uint8 arithmetic: the 1.5B
    model's lm_head has 233M codes)."""
    bits = ((halves >> bit) & 1).reshape(*halves.shape[:3], 8, 8)
    mask = bits[..., 0].clone()
    for i in range(1, 8):
        mask |= bits[..., i] << i
    return mask.flatten(2)


def _packed_codes(
    qweight: torch.Tensor, bits: int, col_index: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """uint8 codes [out, in] -> octets of 16 rows x 8 columns in vpdpbusd order (woq_kernels.cpp's
    layout; ``col_index``: column gather with padding)."""
    n = qweight.shape[0]
    q = qweight.cpu() if col_index is None else F.pad(qweight.cpu(), (0, 1))[:, col_index]
    padded_in = q.shape[1]
    q = F.pad(q, (0, 0, 0, rows - n))
    # [blocks, 16 rows, octets, 2 halves, 4 columns] -> [blocks, octets, halves, 16 rows, 4 columns]:
    # byte 4n + i of a half is row n, column i, the four bytes one vpdpbusd lane multiplies.
    halves = q.reshape(rows // BLOCK_N, BLOCK_N, padded_in // 8, 2, 4).permute(0, 2, 3, 1, 4)
    halves = halves.reshape(rows // BLOCK_N, padded_in // 8, 2, 4 * BLOCK_N).contiguous()
    if bits == 8:
        return halves.flatten(2).contiguous()
    nibbles = (halves[:, :, 0] & 0x0F) | ((halves[:, :, 1] & 0x0F) << 4)
    # 5 / 6 bits: after each octet's 64 bytes of nibbles, its bit planes (bit 4 of half 0's codes,
    # of half 1's, then bit 5 likewise) as 64-bit little-endian masks.
    planes = [_bit_masks(halves, bit) for bit in range(4, bits)]
    return torch.cat([nibbles, *planes], dim=2).contiguous()


def _code_offset(bits: int) -> int:
    """What the kernel adds to a code on conversion: bf16 128 + q (4-6 bits), q + 1 (int8); folded into zscales."""
    return 1 if bits == 8 else 128


def pack(weight: QuantizedWeight, bias: torch.Tensor | None) -> WoqData:
    """The kernel's layout: codes in AMX VNNI order per 16 output rows, scales per block and group."""
    n, k = weight.out_features, weight.in_features
    col_index, chunks = column_layout(weight)
    padded_in = col_index.numel()
    rows = -(-n // BLOCK_N) * BLOCK_N
    scales = weight.scales.float().cpu()
    zscales = (weight.zeros.float().cpu() + _code_offset(weight.bits)) * scales
    identity = torch.equal(col_index[:k], torch.arange(k)) and bool((col_index[k:] == k).all())
    return WoqData(
        codes=_packed_codes(weight.qweight, weight.bits, col_index, rows),
        scales=_blocked(scales, rows),
        zscales=_blocked(zscales, rows),
        chunks=chunks,
        bias=None if bias is None else bias.detach().float().cpu().contiguous(),
        bits=weight.bits,
        out_features=n,
        in_features=k,
        padded_in=padded_in,
        col_index=None if identity else col_index,
    )


def prepare(weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> WoqData | None:
    """Pack once at load time; None where this kernel cannot run (the layer then runs dequantized)."""
    if weight.bits not in (4, 8) or weight.qweight.device.type != "cpu" or extension() is None:
        return None
    return pack(weight, bias)


def prepare_codebook(weight: CodebookWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> WoqData | None:
    """Pack an NF4 / FP4 ``CodebookWeight`` whose blocks tile its rows; None otherwise (chunked decode then)."""
    grouped = row_blocks(weight)
    if grouped is None or grouped.qweight.device.type != "cpu" or extension() is None:
        return None
    data = pack(grouped, bias)
    data.zscales = torch.empty(0)  # no zero point: y = absmax * sum(level[q] * x)
    levels = weight.code.float().cpu()
    hi = levels.to(torch.bfloat16)
    lo = (levels - hi.float()).to(torch.bfloat16)
    data.table, data.table_lo = (F.pad(t, (0, 16)).view(torch.int16).contiguous() for t in (hi, lo))
    return data


def _exact_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` if that loses nothing, else None."""
    narrow = t.to(dtype)
    return narrow if torch.equal(narrow.to(t.dtype), t) else None


def pack_two_level(weight: AffineGroupWeight, rows: int) -> list[torch.Tensor] | None:
    """(d, sc, dmin, mn, zc) as ``TwoLevelScales`` in woq_kernels.cpp reads them, or None where the
    narrow types would lose something (not so for GGUF blocks: fp16 d, sub-scales of at most 8 bits)."""
    d = _exact_as(weight.d.cpu(), torch.float16)
    sc = _exact_as(weight.sc.cpu(), torch.int8)
    dmin = None if weight.dmin is None else _exact_as(weight.dmin.cpu(), torch.float16)
    mn = None if weight.mn is None else _exact_as(weight.mn.cpu(), torch.uint8)
    if d is None or sc is None or (weight.dmin is not None and (dmin is None or mn is None)):
        return None
    empty = torch.empty(0)
    zc = (weight.zero.cpu().float() + _code_offset(weight.bits)).unsqueeze(1)
    return [
        _blocked(d, rows).view(torch.int16),
        empty if bool((sc == 1).all()) else _blocked(sc, rows),
        empty if dmin is None else _blocked(dmin, rows).view(torch.int16),
        empty if mn is None or bool((mn == 1).all()) else _blocked(mn, rows),
        _blocked(zc, rows).reshape(-1, BLOCK_N).contiguous(),
    ]


def prepare_affine(
    weight: AffineGroupWeight, bias: torch.Tensor | None, dtype: torch.dtype
) -> WoqData | None:
    """Pack GGUF-style groups (groups of 32 or 16, two-level scales); None where the kernel cannot run."""
    n, k = weight.out_features, weight.in_features
    if (
        weight.group_size not in (16, CHUNK)
        or k % CHUNK
        or weight.device.type != "cpu"
        or extension() is None
    ):
        return None
    rows = -(-n // BLOCK_N) * BLOCK_N
    two_level = pack_two_level(weight, rows)
    if two_level is None:  # float32 scale and zero-point scale per group (2 or 4 more bits a weight)
        scales = weight.scales.float().cpu()
        zero_codes = weight.zero.cpu().float().unsqueeze(1) + _code_offset(weight.bits)
        scales, zscales = _blocked(scales, rows), _blocked(zero_codes * scales + weight.offsets.cpu(), rows)
    else:
        scales = zscales = torch.empty(0)
    return WoqData(
        codes=_packed_codes(weight.qweight, weight.bits, None, rows),
        scales=scales,
        zscales=zscales,
        chunks=torch.arange(weight.num_groups + 1, dtype=torch.int32),
        bias=None if bias is None else bias.detach().float().cpu().contiguous(),
        bits=weight.bits,
        out_features=n,
        in_features=k,
        padded_in=k,
        col_index=None,
        group_cols=weight.group_size,
        two_level=two_level,
        groups_per_super=weight.super_size // weight.group_size,
        int8_activations=True,
    )


def _amx_min_rows(data: WoqData) -> int:
    return AMX_MIN_ROWS["table" if data.table is not None else data.bits]


def _vnni_max_rows(data: WoqData) -> int:
    if not data.int8_activations or data.table is not None or not INT8_ACTIVATIONS:
        return 0
    return VNNI_MAX_ROWS[data.bits]


def _bound(data: WoqData) -> Any:
    if data.bound is None:
        data.bound = extension().BoundWeight(
            data.codes, data.scales, data.zscales, data.chunks, data.bias, data.table, data.bits,
            data.out_features, data.group_cols, data.two_level, data.groups_per_super,
        )  # fmt: skip
    return data.bound


def _run(
    data: WoqData, x: torch.Tensor, bias: torch.Tensor | None, out_fp32: bool, table: torch.Tensor | None
) -> torch.Tensor:
    return extension().woq_linear(
        x, data.codes, data.scales, data.zscales, data.chunks, bias, data.bits, data.out_features,
        out_fp32, _amx_min_rows(data), table, data.group_cols, data.two_level, data.groups_per_super,
        _vnni_max_rows(data),
    )  # fmt: skip


def _padded_columns(data: WoqData, x2: torch.Tensor) -> torch.Tensor:
    """x [rows, in] in the packed column order: act-order gather, zero padding."""
    if data.col_index is not None:
        return F.pad(x2, (0, 1))[:, data.col_index]
    if data.padded_in != data.in_features:
        return F.pad(x2, (0, data.padded_in - data.in_features))
    return x2


def _panel_matmul(data: WoqData, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = _padded_columns(data, x.reshape(-1, data.in_features)).contiguous()
    return _bound(data).prefill(x2).reshape(*lead, data.out_features)


def embedding_rows(data: WoqData, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the packed integer-code weight, dequantized: float32 [len(ids), in_features]."""
    return _bound(data).rows(ids.to(torch.long))[:, : data.in_features]


def apply(data: WoqData, x: torch.Tensor) -> torch.Tensor:
    """y = x @ dequantize(W)^T + bias for x [..., in], in x's dtype."""
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and rows >= PANEL_MIN_ROWS and data.table is None:
        return _panel_matmul(data, x)
    if (
        x.dtype == torch.bfloat16
        and x.dim() == 2
        and data.padded_in == data.in_features
        and data.col_index is None
    ):
        # The decode step's path: no reshaping, the fixed arguments bound once.
        return _bound(data)(x, _amx_min_rows(data), _vnni_max_rows(data))
    lead = x.shape[:-1]
    x2 = _padded_columns(data, x.reshape(-1, data.in_features))
    if x.dtype == torch.bfloat16:
        y = _run(data, x2.contiguous(), data.bias, out_fp32=False, table=data.table)
    else:
        # Other dtypes: split x into two bf16 parts (x = hi + lo to ~2**-16) so the bf16 kernel
        # still gives a float32-accurate product. Integer codes are exact in bf16; table levels
        # are split the same way (level = hi + lo), and the lo levels get one more pass with hi x.
        xf = x2.float()
        hi = xf.to(torch.bfloat16)
        lo = (xf - hi.float()).to(torch.bfloat16)
        rows = xf.shape[0]
        both = _run(data, torch.cat([hi, lo]), None, out_fp32=True, table=data.table)
        y = both[:rows] + both[rows:]
        if data.table_lo is not None:
            y += _run(data, hi, None, out_fp32=True, table=data.table_lo)
        if data.bias is not None:
            y += data.bias
        y = y.to(x.dtype)
    return y.reshape(*lead, data.out_features)


register_kernel(
    Kernel("cpu-woq", QuantizedWeight, "cpu", (None,), lambda w, b, a, dt: prepare(w, b, dt), apply)
)
register_kernel(
    Kernel("cpu-woq", CodebookWeight, "cpu", (None,), lambda w, b, a, dt: prepare_codebook(w, b, dt), apply)
)
register_kernel(
    Kernel("cpu-woq", AffineGroupWeight, "cpu", (None,), lambda w, b, a, dt: prepare_affine(w, b, dt), apply)
)
