"""Integer codes with two-level float scales: GGUF's Q4_0 / Q4_1 / Q5_x / Q8_0 / K-quant blocks.

Paper: none; the formats are ggml's (``ggml-common.h``), whose K-quants (Kawrakow, llama.cpp
PR #1684, 2023) quantize the scales and mins of 16- or 32-value sub-blocks again inside
256-value super-blocks. Idea: every such block is affine per group,

    W[n, k] = (d[n, s] * sc[n, g]) * (q[n, k] - zero[n]) - dmin[n, s] * mn[n, g]

with ``d`` / ``dmin`` the super-block's fp16 scales, ``sc`` / ``mn`` the group's small integer
scale and min (1 and absent for the one-level types, whose super-block is the group), and a
per-row zero code for the symmetric types (Q8_0 128, Q6_K 32, ...). Keeping the two levels
apart is what keeps the weight as small as the file (Q4_K streams 4.6 bits a weight, not the 6
of a float32 scale and offset per group of 32) and exact: ``dequantize`` computes
``scale * (q - zero) - offset`` in float32 in ggml's order, so it equals ``gguf.quants`` bit for bit.

Switch on: automatic when a GGUF file with these types is loaded (``loading/gguf.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from effinfer.quant.base import CompressedWeight

CODE_BITS = (4, 5, 6, 8)  # code widths the kernels stream (2- and 3-bit codes are widened to 4)


@dataclass
class AffineGroupWeight(CompressedWeight):
    kind = "affine"

    qweight: torch.Tensor  # uint8 [out, in], codes in [0, 2**bits - 1]
    d: torch.Tensor  # float32 [out, in // super_size]: the super-block scale
    sc: torch.Tensor  # int16 [out, in // group_size]: the group's scale is d * sc
    zero: torch.Tensor  # int16 [out]: the row's zero code (0 where the blocks have a float min)
    dmin: torch.Tensor | None  # float32 [out, in // super_size], or None: no float min
    mn: torch.Tensor | None  # int16 [out, in // group_size]: the group's offset is dmin * mn
    bits: int  # the width the codes are streamed at: 4, 5, 6 or 8
    group_size: int  # 16 or 32
    super_size: int  # a multiple of group_size: 256 for K-quants, 32 otherwise

    def __post_init__(self) -> None:
        if self.bits not in CODE_BITS:
            raise ValueError(f"unsupported code width {self.bits}")
        out_features, in_features = self.qweight.shape
        if self.group_size <= 0 or self.super_size % self.group_size or in_features % self.super_size:
            raise ValueError(
                f"{in_features} columns are not whole super-blocks of {self.super_size} "
                f"in groups of {self.group_size}"
            )
        if (self.dmin is None) != (self.mn is None):
            raise ValueError("dmin and mn come together")
        groups, supers = (out_features, self.num_groups), (out_features, in_features // self.super_size)
        for name, expected in (("d", supers), ("sc", groups), ("zero", (out_features,)),
                               ("dmin", supers), ("mn", groups)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {expected}")

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

    @property
    def scales(self) -> torch.Tensor:
        """float32 [out, groups]: d * sc, exact (an fp16 times an integer below 2**8)."""
        return self.d.repeat_interleave(self.super_size // self.group_size, dim=1) * self.sc.float()

    @property
    def offsets(self) -> torch.Tensor:
        """float32 [out, groups]: dmin * mn (zeros without a float min)."""
        if self.dmin is None:
            return torch.zeros(self.out_features, self.num_groups, device=self.device)
        return self.dmin.repeat_interleave(self.super_size // self.group_size, dim=1) * self.mn.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.qweight.shape
        q = (self.qweight.to(torch.int16) - self.zero.unsqueeze(1)).float().reshape(n, -1, self.group_size)
        w = self.scales.unsqueeze(-1) * q
        if self.dmin is not None:
            w = w - self.offsets.unsqueeze(-1)
        return w.reshape(n, k).to(dtype)

    def _map(self, fn) -> AffineGroupWeight:
        """The same weight with ``fn`` applied to every per-row tensor."""
        return AffineGroupWeight(
            fn(self.qweight), fn(self.d), fn(self.sc), fn(self.zero),
            None if self.dmin is None else fn(self.dmin), None if self.mn is None else fn(self.mn),
            self.bits, self.group_size, self.super_size,
        )  # fmt: skip

    def to(self, device: torch.device | str) -> AffineGroupWeight:
        return self._map(lambda t: t.to(device))

    def rows(self, start: int, stop: int) -> AffineGroupWeight:
        return self._map(lambda t: t[start:stop])

    def index_rows(self, index: torch.Tensor) -> AffineGroupWeight:
        """Rows in the order ``index`` gives (llama.cpp's rotary row order back to HF's)."""
        return self._map(lambda t: t[index])

    def nbytes(self) -> int:
        """Bytes as the kernel streams them: ``bits`` per code, one per group scale and min where
        they are not all 1 (one-level blocks), two per super-block scale and min."""
        supers = self.d.numel() * (1 if self.dmin is None else 2)
        groups = sum(t.numel() for t in (self.sc, self.mn) if t is not None and bool((t != 1).any()))
        return self.qweight.numel() * self.bits // 8 + groups + 2 * supers

    def regrouped(self, bits: int, group_size: int, super_size: int) -> AffineGroupWeight:
        """The same numbers with wider codes, smaller groups and / or super-blocks: exact."""
        if bits < self.bits or self.group_size % group_size or self.super_size % super_size:
            raise ValueError(
                f"cannot narrow {self.bits}-bit groups of {self.group_size} "
                f"(super-blocks of {self.super_size}) to {bits}/{group_size}/{super_size}"
            )
        if super_size % group_size:
            raise ValueError(f"super-blocks of {super_size} are not whole groups of {group_size}")

        def split(t: torch.Tensor | None, factor: int) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(factor, dim=1)

        supers, groups = self.super_size // super_size, self.group_size // group_size
        sc, mn = split(self.sc, groups), split(self.mn, groups)
        return AffineGroupWeight(
            self.qweight, split(self.d, supers), sc, self.zero, split(self.dmin, supers), mn,
            bits, group_size, super_size,
        )  # fmt: skip

    def with_float_min(self) -> AffineGroupWeight:
        """The same numbers with a (zero) float min where the blocks have none, to fuse with min types."""
        if self.dmin is not None:
            return self
        return dataclasses.replace(self, dmin=torch.zeros_like(self.d), mn=torch.zeros_like(self.sc))

    @classmethod
    def cat_rows(cls, parts: list[AffineGroupWeight]) -> AffineGroupWeight:
        """Stack along the output dimension; parts of different layouts meet at the finest one."""
        bits = max(p.bits for p in parts)
        group = min(p.group_size for p in parts)
        super_size = min(p.super_size for p in parts)
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("cannot fuse weights of different input widths")
        parts = [p.regrouped(bits, group, super_size) for p in parts]
        if any(p.dmin is not None for p in parts):
            parts = [p.with_float_min() for p in parts]
        with_min = parts[0].dmin is not None
        return AffineGroupWeight(
            torch.cat([p.qweight for p in parts]),
            torch.cat([p.d for p in parts]),
            torch.cat([p.sc for p in parts]),
            torch.cat([p.zero for p in parts]),
            torch.cat([p.dmin for p in parts]) if with_min else None,
            torch.cat([p.mn for p in parts]) if with_min else None,
            bits,
            group,
            super_size,
        )

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"qweight": self.qweight, "d": self.d, "sc": self.sc, "zero": self.zero}
        if self.dmin is not None:
            tensors.update(dmin=self.dmin, mn=self.mn)
        return tensors, {"bits": self.bits, "group_size": self.group_size, "super_size": self.super_size}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> AffineGroupWeight:
        return cls(
            tensors["qweight"], tensors["d"], tensors["sc"], tensors["zero"],
            tensors.get("dmin"), tensors.get("mn"),
            int(metadata["bits"]), int(metadata["group_size"]), int(metadata["super_size"]),
        )  # fmt: skip
