"""NF4 / FP4 weights with block-wise absmax scaling and optional double quantization (bitsandbytes' 4-bit).

Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". Idea: the weight is
cut into blocks of 64 consecutive values (of the flattened tensor, as bitsandbytes does), each
block is divided by its absmax and every value becomes the nearest of 16 levels: NF4's levels
are quantiles of a standard normal (equal probability mass per level, for normally distributed
weights), FP4's are a 1-2-1 float. Double quantization stores the float32 absmax values
themselves in 8 bits (bitsandbytes' dynamic map, blocks of 256, minus their mean), which brings
the cost from 4.5 to about 4.127 bits per parameter.

Switch on: ``--quantization nf4 | fp4`` (while loading), ``effinfer quantize --method nf4
[--double-quant]``, or load a checkpoint written by transformers' bitsandbytes integration
(``loading/bnb.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effinfer.quant.base import CompressedWeight
from effinfer.quant.integer import QuantizedWeight

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # absmax values per block of double quantization, as in bitsandbytes
_NF4_OUTER_QUANTILE = 0.9677083  # bitsandbytes: the largest level sits at this normal quantile

# bitsandbytes' FP4, in code order (sign bit, two exponent bits, one mantissa bit), before scaling by
# 1/12 so that the largest magnitude is 1. A table rather than a formula: its exponent bias is unusual.
_FP4_BY_CODE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels (float32, ascending): 8 positive and 7 negative normal quantiles and an exact 0.

    Quantiles of N(0, 1) at evenly spaced probabilities from 0.5 to 0.9677083 (8 on the positive
    side, 7 on the negative one, so zero is a level), divided by the largest.
    """
    positive = torch.special.ndtri(torch.linspace(_NF4_OUTER_QUANTILE, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(_NF4_OUTER_QUANTILE, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return levels / levels.max()


def fp4_levels() -> torch.Tensor:
    """bitsandbytes' 16 FP4 levels (float32) indexed by code: codes 8-15 are the negatives of 0-7."""
    magnitudes = torch.tensor(_FP4_BY_CODE, dtype=torch.float32)
    levels = torch.cat([magnitudes, -magnitudes])
    return levels / levels.abs().max()


def codebook(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return nf4_levels()
    if quant_type == "fp4":
        return fp4_levels()
    raise ValueError(f"unknown 4-bit type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 float32 values, ascending) used for double quantization.

    For exponent i = 0..6 the decade 10**(i-6) is split into 2**i linear steps between 0.1 and 1
    (bin midpoints), positive and negative; with 0 and 1 that makes 256 values.
    """
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += [(10 ** (i - 6)) * mids, -(10 ** (i - 6)) * mids]
    return torch.cat(values).float().sort().values


def _nearest_codes(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each value in [-1, 1]; a value on a midpoint takes the lower level."""
    order = torch.argsort(levels, stable=True)  # FP4's levels are not sorted by code
    ordered = levels[order]
    bounds = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(scaled, bounds)].to(torch.uint8)


def blockwise_absmax_codes(
    values: torch.Tensor, levels: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], absmax float32 [ceil(n / blocksize)]) of the flattened ``values``.

    Blocks run over consecutive values; the last one may be shorter. An all-zero block keeps
    absmax 0 (its values are coded as the level nearest 0).
    """
    flat = values.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide) so codes on a level boundary round as bitsandbytes' do.
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    return _nearest_codes(scaled, levels), absmax


def blockwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, blocksize: int):
    """float32 [n]: ``levels[codes]`` times the absmax of each value's block."""
    flat = levels.float()[codes.reshape(-1).long()]
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    return (padded * absmax.float()[:, None]).reshape(-1)[:n]


@dataclass
class NestedAbsmax:
    """Double quantization of a run of absmax values: absmax ~= map[codes] * nested_absmax[block] + offset."""

    codes: torch.Tensor  # uint8 [num_blocks]
    nested_absmax: torch.Tensor  # float32 [ceil(num_blocks / blocksize)]
    offset: torch.Tensor  # float32 []: the mean of the absmax values, subtracted before quantizing
    code: torch.Tensor  # float32 [256]: the dynamic map
    blocksize: int = NESTED_BLOCKSIZE

    @property
    def num_blocks(self) -> int:
        return self.codes.numel()

    def dequantize(self) -> torch.Tensor:
        return blockwise_dequantize(self.codes, self.nested_absmax, self.code, self.blocksize) + self.offset

    def nbytes(self) -> int:
        return self.codes.numel() + self.nested_absmax.numel() * 4 + 4

    def blocks(self, start: int, stop: int) -> NestedAbsmax | None:
        """The values of blocks [start, stop), or None when that cuts a nested block in two."""
        if start % self.blocksize or (stop % self.blocksize and stop != self.num_blocks):
            return None
        nested = slice(start // self.blocksize, -(-stop // self.blocksize))
        return NestedAbsmax(
            self.codes[start:stop], self.nested_absmax[nested], self.offset, self.code, self.blocksize
        )

    def to(self, device: torch.device) -> NestedAbsmax:
        return NestedAbsmax(
            self.codes.to(device), self.nested_absmax.to(device), self.offset.to(device),
            self.code.to(device), self.blocksize,
        )  # fmt: skip


def double_quantize(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> NestedAbsmax:
    """8-bit dynamic-map codes of ``absmax - mean(absmax)`` in blocks of ``blocksize``."""
    absmax = absmax.float()
    offset = absmax.mean()
    code = dynamic_map().to(absmax.device)
    codes, nested = blockwise_absmax_codes(absmax - offset, code, blocksize)
    return NestedAbsmax(codes, nested, offset, code, blocksize)


@dataclass
class CodebookWeight(CompressedWeight):
    """W.flatten()[i] ~= code[codes.flatten()[i]] * absmax[i // blocksize].

    Blocks run over the row-major flattened weight, so a block may span two rows when
    ``in_features`` is not a multiple of ``blocksize``. ``absmax`` holds the scales the codes are
    multiplied by; with double quantization they are the decoded 8-bit values, and ``nested``
    keeps the 8-bit form (one entry per stretch of blocks, e.g. per fused q/k/v part) so that
    ``nbytes`` and checkpoint writers see what is stored.
    """

    codes: torch.Tensor  # uint8 [out, in], indices into ``code``
    absmax: torch.Tensor  # float32 [ceil(out * in / blocksize)]
    code: torch.Tensor  # float32 [16]: the levels (bitsandbytes' ``quant_map``)
    quant_type: str = "nf4"
    blocksize: int = 64
    nested: tuple[NestedAbsmax, ...] = ()  # empty: absmax stored as float32
    bits = 4
    kind = "codebook"

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"unknown 4-bit type {self.quant_type!r}")
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"expected 2-D uint8 codes, got {self.codes.dtype} {tuple(self.codes.shape)}")
        blocks = -(-self.codes.numel() // self.blocksize)
        if tuple(self.absmax.shape) != (blocks,):
            raise ValueError(f"absmax has shape {tuple(self.absmax.shape)}, expected {(blocks,)}")
        if self.code.numel() != 16:
            raise ValueError(f"a 4-bit codebook has 16 levels, got {self.code.numel()}")
        if self.nested and sum(n.num_blocks for n in self.nested) != blocks:
            raise ValueError("double-quantized absmax does not cover every block")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def double_quant(self) -> bool:
        return bool(self.nested)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in]: the reference every codebook kernel is tested against."""
        flat = blockwise_dequantize(self.codes, self.absmax, self.code, self.blocksize)
        return flat.view(self.codes.shape).to(dtype)

    def nbytes(self) -> int:
        """Bytes as stored: two codes per byte plus the absmax (float32, or 8-bit with its nested state).

        The 16- and 256-entry maps are shared constants and not counted, as in QLoRA's accounting.
        """
        codes = -(-self.codes.numel() // 2)
        if self.nested:
            return codes + sum(n.nbytes() for n in self.nested)
        return codes + self.absmax.numel() * 4

    def _nested_blocks(self, start: int, stop: int) -> tuple[NestedAbsmax, ...]:
        parts, first = [], 0
        for nested in self.nested:
            last = first + nested.num_blocks
            lo, hi = max(start, first), min(stop, last)
            if lo < hi:
                part = nested.blocks(lo - first, hi - first)
                if part is None:
                    return ()  # cannot slice the 8-bit form here; the float32 absmax stays exact
                parts.append(part)
            first = last
        return tuple(parts)

    def rows(self, start: int, stop: int) -> CodebookWeight:
        """Output rows [start, stop); they must begin on a block boundary (blocks cross rows)."""
        first, last = start * self.in_features, stop * self.in_features
        if first % self.blocksize or (last % self.blocksize and stop != self.out_features):
            raise ValueError(
                f"rows {start}:{stop} of a {self.in_features}-wide weight do not start and end on "
                f"{self.blocksize}-value block boundaries"
            )
        b0, b1 = first // self.blocksize, -(-last // self.blocksize)
        return CodebookWeight(
            self.codes[start:stop], self.absmax[b0:b1], self.code, self.quant_type, self.blocksize,
            self._nested_blocks(b0, b1),
        )  # fmt: skip

    @classmethod
    def cat_rows(cls, parts: list[CodebookWeight]) -> CodebookWeight:
        """Stack weights along the output dimension (fused q/k/v, gate/up)."""
        first = parts[0]
        for p in parts[1:]:
            if (p.in_features, p.blocksize, p.quant_type) != (
                first.in_features,
                first.blocksize,
                first.quant_type,
            ):
                raise ValueError("cannot fuse 4-bit weights with different widths, block sizes or types")
            if not torch.equal(p.code, first.code):
                raise ValueError("cannot fuse 4-bit weights with different codebooks")
        if any(p.codes.numel() % p.blocksize for p in parts[:-1]):
            raise ValueError("cannot fuse 4-bit weights whose last block is partial")
        nested = tuple(n for p in parts for n in p.nested) if all(p.nested for p in parts) else ()
        return CodebookWeight(
            torch.cat([p.codes for p in parts]), torch.cat([p.absmax for p in parts]), first.code,
            first.quant_type, first.blocksize, nested,
        )  # fmt: skip

    def to(self, device: torch.device) -> CodebookWeight:
        return CodebookWeight(
            self.codes.to(device), self.absmax.to(device), self.code.to(device), self.quant_type,
            self.blocksize, tuple(n.to(device) for n in self.nested),
        )  # fmt: skip

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"codes": self.codes, "absmax": self.absmax, "code": self.code}
        for i, n in enumerate(self.nested):
            tensors |= {f"nested.{i}.codes": n.codes, f"nested.{i}.absmax": n.nested_absmax,
                        f"nested.{i}.offset": n.offset, f"nested.{i}.code": n.code}  # fmt: skip
        metadata = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                    "nested_blocksizes": [n.blocksize for n in self.nested]}  # fmt: skip
        return tensors, metadata

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> CodebookWeight:
        nested = tuple(
            NestedAbsmax(
                tensors[f"nested.{i}.codes"],
                tensors[f"nested.{i}.absmax"],
                tensors[f"nested.{i}.offset"],
                tensors[f"nested.{i}.code"],
                int(size),
            )  # fmt: skip
            for i, size in enumerate(metadata["nested_blocksizes"])
        )
        return cls(tensors["codes"], tensors["absmax"], tensors["code"], metadata["quant_type"],
                   int(metadata["blocksize"]), nested)  # fmt: skip


def quantize_codebook(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> CodebookWeight:
    """NF4 / FP4 codes of ``weight`` [out, in] with one absmax per ``blocksize`` consecutive values."""
    levels = codebook(quant_type).to(weight.device)
    codes, absmax = blockwise_absmax_codes(weight, levels, blocksize)
    nested: tuple[NestedAbsmax, ...] = ()
    if double_quant:
        state = double_quantize(absmax)
        nested, absmax = (state,), state.dequantize()
    return CodebookWeight(codes.view(weight.shape), absmax, levels, quant_type, blocksize, nested)


def row_blocks(weight: CodebookWeight) -> QuantizedWeight | None:
    """A CodebookWeight's codes and absmax as per-row groups (``group_size`` = block size, zeros 0).

    Only the layout is borrowed: the codes stay indices into ``weight.code``, so the result is
    for kernels that look the levels up, not for ``QuantizedWeight.dequantize``. None when a
    block would cross a row.
    """
    out_features, in_features = weight.codes.shape
    if in_features % weight.blocksize:
        return None
    scales = weight.absmax.float().reshape(out_features, in_features // weight.blocksize)
    zeros = torch.zeros(scales.shape, dtype=torch.int32, device=scales.device)
    return QuantizedWeight(weight.codes, scales, zeros, 4, weight.blocksize)
