"""Integer codes with a float scale and a float offset per group: GGUF's Q4_1 / Q5_x / K-quant blocks.

Paper: none; the formats are ggml's (``ggml-common.h``), whose K-quants (Kawrakow, llama.cpp
PR #1684, 2023) quantize the scales and mins of 32-value sub-blocks again inside 256-value
super-blocks. Idea: every such block is affine per group, ``W = scale * q - offset``, where the
offset is a float (``dmin * min``, ``-m``), not an integer zero point as in ``QuantizedWeight``;
so the super-block scales are multiplied out once at load (exact in float32: an fp16 times a
6-bit integer) and the same per-group kernel runs every type. ``dequantize`` computes
``scale * q - offset`` in float32 in ggml's own order, so it equals ``gguf.quants`` bit for bit.

Switch on: automatic when a GGUF file with these types is loaded (``loading/gguf.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effinfer.quant.base import CompressedWeight


@dataclass
class AffineGroupWeight(CompressedWeight):
    kind = "affine"

    qweight: torch.Tensor  # uint8 [out, in], codes in [0, 2**bits - 1]
    scales: torch.Tensor  # float32 [out, in // group_size]
    offsets: torch.Tensor  # float32 [out, in // group_size]: W = scale * q - offset
    bits: int  # 4 or 8: the width the codes are stored (and streamed) at
    group_size: int  # 16 or 32

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"unsupported code width {self.bits}")
        out_features, in_features = self.qweight.shape
        if self.group_size <= 0 or in_features % self.group_size:
            raise ValueError(f"{in_features} columns are not whole groups of {self.group_size}")
        expected = (out_features, in_features // self.group_size)
        for name in ("scales", "offsets"):
            shape = tuple(getattr(self, name).shape)
            if shape != expected:
                raise ValueError(f"{name} have shape {shape}, expected {expected}")

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
        return self.in_features // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.qweight.shape
        q = self.qweight.float().reshape(n, -1, self.group_size)
        w = self.scales.float().unsqueeze(-1) * q - self.offsets.float().unsqueeze(-1)
        return w.reshape(n, k).to(dtype)

    def to(self, device: torch.device | str) -> AffineGroupWeight:
        return AffineGroupWeight(
            self.qweight.to(device),
            self.scales.to(device),
            self.offsets.to(device),
            self.bits,
            self.group_size,
        )

    def nbytes(self) -> int:
        """Bytes of codes at ``bits`` each plus the float32 scales and offsets."""
        return self.qweight.numel() * self.bits // 8 + (self.scales.numel() + self.offsets.numel()) * 4

    def rows(self, start: int, stop: int) -> AffineGroupWeight:
        return AffineGroupWeight(
            self.qweight[start:stop],
            self.scales[start:stop],
            self.offsets[start:stop],
            self.bits,
            self.group_size,
        )

    def regrouped(self, bits: int, group_size: int) -> AffineGroupWeight:
        """The same numbers with wider codes and / or smaller groups (each group's scale repeated): exact."""
        if bits < self.bits or self.group_size % group_size:
            raise ValueError(
                f"cannot narrow {self.bits}-bit groups of {self.group_size} to {bits}/{group_size}"
            )
        repeat = self.group_size // group_size
        return AffineGroupWeight(
            self.qweight,
            self.scales.repeat_interleave(repeat, dim=1),
            self.offsets.repeat_interleave(repeat, dim=1),
            bits,
            group_size,
        )

    @classmethod
    def cat_rows(cls, parts: list[AffineGroupWeight]) -> AffineGroupWeight:
        """Stack along the output dimension; parts of different widths / groups meet at the finer layout."""
        bits = max(p.bits for p in parts)
        group = min(p.group_size for p in parts)
        parts = [p if (p.bits, p.group_size) == (bits, group) else p.regrouped(bits, group) for p in parts]
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("cannot fuse weights of different input widths")
        return AffineGroupWeight(
            torch.cat([p.qweight for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.offsets for p in parts]),
            bits,
            group,
        )

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"qweight": self.qweight, "scales": self.scales, "offsets": self.offsets}
        return tensors, {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> AffineGroupWeight:
        return cls(
            tensors["qweight"],
            tensors["scales"],
            tensors["offsets"],
            int(metadata["bits"]),
            int(metadata["group_size"]),
        )
