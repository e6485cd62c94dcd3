"""Integer codes with group scales and zero points: RTN, GPTQ, AWQ and W8A8 weights (and GGUF Q8_0 / Q4_0).

Every weight-only scheme here (RTN, GPTQ, AWQ, and the GPTQ / AWQ / compressed-tensors
checkpoint layouts) stores the same thing: integer codes ``q`` in ``[0, 2**bits - 1]``, and per
(output row, group of ``group_size`` input columns) a float ``scale`` and an integer ``zero``, so

    W[n, k] ~= (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]

Symmetric schemes are the special case ``zero = 2**(bits-1)``. ``g(k)`` is ``k // group_size``
unless GPTQ's act-order assigned groups in another order (``g_idx``). Formats pack the codes
into int32 words and kernels repack them for their hardware; this class keeps them unpacked,
one uint8 per code, which is the simplest thing to read, test and convert.

Round-to-nearest (``quantize_rtn``) is the arithmetic that makes these codes from a float
weight; GPTQ and AWQ (``compress/quant/``) choose the codes more carefully but store the same.
Switch on: ``--quantization int8 | int4 | w8a8`` (RTN while loading) or ``effinfer quantize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effinfer.quant.base import CompressedWeight


@dataclass
class QuantizedWeight(CompressedWeight):
    kind = "int"

    qweight: torch.Tensor  # uint8 [out, in], codes in [0, 2**bits - 1]
    scales: torch.Tensor  # float32 [out, num_groups]
    zeros: torch.Tensor  # int32 [out, num_groups], in [0, 2**bits - 1]; 2**(bits-1) when symmetric
    bits: int
    group_size: int  # input columns per group; ``in_features`` for one scale per output row
    g_idx: torch.Tensor | None = None  # int32 [in]: group of each input column (GPTQ act-order)

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"unsupported bit width {self.bits}")
        out_features, in_features = self.qweight.shape
        groups = self.num_groups
        if tuple(self.scales.shape) != (out_features, groups):
            raise ValueError(
                f"scales have shape {tuple(self.scales.shape)}, expected {(out_features, groups)}"
            )
        if tuple(self.zeros.shape) != (out_features, groups):
            raise ValueError(f"zeros have shape {tuple(self.zeros.shape)}, expected {(out_features, groups)}")
        if self.g_idx is not None and tuple(self.g_idx.shape) != (in_features,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected {(in_features,)}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def num_groups(self) -> int:
        if self.g_idx is not None:
            return int(self.g_idx.max().item()) + 1 if self.g_idx.numel() else 0
        return -(-self.in_features // self.group_size)

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 2 ** (self.bits - 1)).all())

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def has_act_order(self) -> bool:
        """True when columns are not grouped in their natural order (GPTQ ``desc_act``)."""
        if self.g_idx is None:
            return False
        natural = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
        return not torch.equal(self.g_idx.long(), natural)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] these codes stand for: the reference every kernel is tested against."""
        groups = self.group_index()
        scale = self.scales.float()[:, groups]
        zero = self.zeros.float()[:, groups]
        return ((self.qweight.float() - zero) * scale).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        g_idx = self.g_idx.to(device) if self.g_idx is not None else None
        return QuantizedWeight(
            self.qweight.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.bits,
            self.group_size,
            g_idx,
        )

    def nbytes(self) -> int:
        """Bytes of the packed form (codes at ``bits`` each, plus scales and zeros), as stored on disk."""
        codes = self.qweight.numel() * self.bits // 8
        side = self.scales.numel() * 2 + self.zeros.numel() * self.bits // 8
        return codes + side

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows [start, stop), e.g. one checkpoint tensor of a fused q/k/v weight."""
        return QuantizedWeight(
            self.qweight[start:stop], self.scales[start:stop], self.zeros[start:stop],
            self.bits, self.group_size, self.g_idx,
        )  # fmt: skip

    @classmethod
    def cat_rows(cls, parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack weights along the output dimension (fusing q/k/v or gate/up); they must share groups."""
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size, first.in_features):
                raise ValueError("cannot fuse quantized weights with different bits, group size or width")
            if not torch.equal(p.group_index(), first.group_index()):
                raise ValueError("cannot fuse quantized weights whose act-order groups differ")
        return QuantizedWeight(
            torch.cat([p.qweight for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.zeros for p in parts]),
            first.bits,
            first.group_size,
            first.g_idx,
        )

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx
        return tensors, {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> QuantizedWeight:
        return cls(
            tensors["qweight"], tensors["scales"], tensors["zeros"], int(metadata["bits"]),
            int(metadata["group_size"]), tensors.get("g_idx"),
        )  # fmt: skip


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` [rows, cols] (one group per row).

    Symmetric: ``scale = absmax / (2**(b-1) - 1)`` and ``zero = 2**(b-1)``, so +-absmax are
    representable exactly. Asymmetric: the range [min, max] (stretched to include 0, so that
    zero padding stays exact) is spread over all ``2**b`` levels.
    """
    w = w.float()
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1) / half
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        maxq = 2**bits - 1
        low = w.amin(dim=1).clamp(max=0)
        high = w.amax(dim=1).clamp(min=0)
        scale = (high - low) / maxq
        zero = torch.round(-low / torch.where(scale > 0, scale, 1)).clamp(0, maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` [rows, cols] with per-row ``scale`` / ``zero`` (shape [rows] or [rows, 1])."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
) -> QuantizedWeight:
    """Round-to-nearest codes of a float weight [out, in]. ``group_size=None``: one group per output row.

    A width that is not a multiple of the group size (stories260K's 172-wide down projection)
    gets a shorter last group rather than being refused.
    """
    out_features, in_features = weight.shape
    group = group_size or in_features
    if group <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    num_groups = -(-in_features // group)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, num_groups, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(out_features, num_groups, dtype=torch.int32, device=weight.device)
    for g in range(num_groups):
        cols = slice(g * group, min((g + 1) * group, in_features))
        scale, zero = group_qparams(weight[:, cols], bits, symmetric)
        codes[:, cols] = quantize_codes(weight[:, cols], scale, zero, bits).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero.to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, bits, group)
