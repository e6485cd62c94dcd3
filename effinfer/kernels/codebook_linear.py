"""Matrix multiply with NF4 / FP4 weights (``quant/codebook.CodebookWeight``), decoded chunk by chunk.

Paper: QLoRA (Dettmers et al. 2023). Idea: codes stay packed two per byte; for each chunk of
output rows a 256-entry table turns every byte into its two levels at once, the levels are
multiplied by their block's absmax and the chunk's product is taken, so at most one chunk of
the weight exists in floating point at a time. Chunks start on block boundaries (blocks run
over the flattened weight and may cross rows) and hold about a million values, so the Python
cost per chunk is small next to its decode and matmul.

This is the fallback. When the blocks tile the rows (``in_features`` a multiple of the block
size, as in every common model), ``quant.codebook.row_blocks`` presents the weight as per-row groups and the
weight-only kernels run it with a level table: ``kernels/cpu/woq.py`` (AVX512 / AMX) on CPU,
``kernels/triton/woq.py`` on GPU. Switch on: registered for every ``CodebookWeight`` on any
device after those kernels, so ``quant_linear.prepare`` uses it where they do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effinfer.quant.codebook import CodebookWeight
from effinfer.quant.registry import Kernel, register_kernel

CHUNK_VALUES = 1 << 20  # weight values decoded per step: ~4 MB of fp32 temporaries


@dataclass
class CodebookLinear:
    packed: torch.Tensor  # uint8 [ceil(out * in / 2)]: code of value 2i in the high nibble, 2i+1 in the low
    pair_table: torch.Tensor  # float32 [256, 2]: the two levels each byte stands for
    absmax: torch.Tensor  # float32 [num_blocks]
    bias: torch.Tensor | None
    out_features: int
    in_features: int
    blocksize: int
    chunk_rows: int  # a multiple of the rows after which a block boundary recurs
    dtype: torch.dtype


def prepare(weight: CodebookWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> CodebookLinear:
    """Pack ``weight`` (a CodebookWeight) for ``apply``; activations of ``dtype`` (bf16, fp16 or fp32)."""
    codes = weight.codes.reshape(-1)
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    packed = (codes[0::2] << 4) | codes[1::2]
    levels = weight.code.float()
    byte = torch.arange(256, device=levels.device)
    pair_table = torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)
    out_features, in_features, blocksize = weight.out_features, weight.in_features, weight.blocksize
    # Row r starts on a block boundary when r * in_features is a multiple of blocksize (and even,
    # so the chunk starts on a whole byte): chunks are multiples of that many rows.
    step = math.lcm(in_features, blocksize, 2) // in_features
    chunk_rows = max(step, CHUNK_VALUES // in_features // step * step)
    return CodebookLinear(
        packed.contiguous(), pair_table, weight.absmax.float().contiguous(),
        bias.to(dtype) if bias is not None else None,
        out_features, in_features, blocksize, chunk_rows, dtype,
    )  # fmt: skip


def decode_rows(data: CodebookLinear, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the weight as float32 [stop - start, in]; ``start`` on a chunk boundary."""
    first, last = start * data.in_features, stop * data.in_features
    values = data.pair_table[data.packed[first // 2 : -(-last // 2)].long()].reshape(-1)[: last - first]
    n = values.numel()
    block0 = first // data.blocksize
    blocks = -(-n // data.blocksize)
    padded = F.pad(values, (0, -n % data.blocksize)).view(blocks, data.blocksize)
    scaled = padded * data.absmax[block0 : block0 + blocks, None]
    return scaled.reshape(-1)[:n].view(stop - start, data.in_features)


def apply(data: CodebookLinear, x: torch.Tensor) -> torch.Tensor:
    full_bias = data.bias.to(x.dtype) if data.bias is not None else None
    if data.chunk_rows >= data.out_features:  # small layers: one decode, no output copy
        return F.linear(x, decode_rows(data, 0, data.out_features).to(x.dtype), full_bias)
    out = x.new_empty(*x.shape[:-1], data.out_features)
    for start in range(0, data.out_features, data.chunk_rows):
        stop = min(start + data.chunk_rows, data.out_features)
        bias = full_bias[start:stop] if full_bias is not None else None
        out[..., start:stop] = F.linear(x, decode_rows(data, start, stop).to(x.dtype), bias)
    return out


# Below the weight-only kernels' table path: this runs where they do not apply.
register_kernel(
    Kernel(
        "codebook", CodebookWeight, None, (None,), lambda w, b, a, dt: prepare(w, b, dt), apply, priority=-1
    )
)
