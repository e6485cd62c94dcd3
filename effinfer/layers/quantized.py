"""The in-memory form of a quantized weight, shared by quantizers, checkpoint formats and kernels.

Every weight-only scheme here (RTN, GPTQ, AWQ, and the GPTQ / AWQ / compressed-tensors
checkpoint layouts) stores the same thing: integer codes ``q`` in ``[0, 2**bits - 1]``, and per
(output row, group of ``group_size`` input columns) a float ``scale`` and an integer ``zero``, so

    W[n, k] ~= (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]

Symmetric schemes are the special case ``zero = 2**(bits-1)``. ``g(k)`` is ``k // group_size``
unless GPTQ's act-order assigned groups in another order (``g_idx``). Formats pack the codes
into int32 words and kernels repack them for their hardware; this class keeps them unpacked,
one uint8 per code, which is the simplest thing to read, test and convert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
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

    @staticmethod
    def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
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
