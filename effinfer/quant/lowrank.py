"""Low-rank weights: a matrix stored as the product of two thin factors, W [out, in] ~= U [out, r] @ V [r, in].

Papers: ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for
Compressing Large Language Models"), SVD-LLM (Wang et al. 2024, "SVD-LLM: Truncation-aware
Singular Value Decomposition for Large Language Model Compression").
Idea: a rank-r factorization keeps r * (out + in) numbers instead of out * in, and x @ W^T runs as
two thin products, (x @ V^T) @ U^T, that read fewer bytes than W does.
Switch on: ``effinfer compress --low-rank 0.7 --method svd-llm --model M --out DIR`` writes such a
checkpoint (``compress/lowrank.py``); ``LLM(DIR)`` runs it with ``kernels/lowrank_linear.py``.

A fused Linear (q/k/v, gate/up) keeps one (U_i, V_i) pair per checkpoint tensor ("parts"), each
at its own rank. Joining them block-diagonally (U = diag(U_q, U_k, U_v), V = [V_q; V_k; V_v]) would
also be two products, but U's zero blocks would be read and multiplied: for SmolLM2's q/k/v (576,
192, 192 rows) at equal ranks that is 960 * 3r numbers instead of 960 * r, more than the dense
matrix at the ranks that matter. So the kernel stacks the V_i into one product and runs each U_i
on its slice of the result: one product for V, one per part for U, and no zeros.
A part whose factorization would not save numbers is kept whole: its ``u`` is None and ``v`` is
the part's rows of W itself (U = identity), so the stacked first product yields its output directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effinfer.quant.base import CompressedWeight


@dataclass
class LowRankWeight(CompressedWeight):
    """W = [U_0 @ V_0; U_1 @ V_1; ...] over row blocks; a block with ``u`` None is V itself."""

    us: tuple[torch.Tensor | None, ...]  # per part: [out_i, r_i], or None for a part kept whole
    vs: tuple[torch.Tensor, ...]  # per part: [r_i, in], or the part's rows [out_i, in] when u is None
    kind = "low_rank"

    def __post_init__(self) -> None:
        self.us, self.vs = tuple(self.us), tuple(self.vs)
        if not self.vs or len(self.us) != len(self.vs):
            raise ValueError(f"need one U per V and at least one part, got {len(self.us)} and {len(self.vs)}")
        widths = {v.shape[1] if v.dim() == 2 else -1 for v in self.vs}
        if len(widths) != 1 or -1 in widths:
            raise ValueError(f"every V must be 2-D with the same in_features, got {sorted(widths)}")
        for u, v in zip(self.us, self.vs):
            if u is not None and (u.dim() != 2 or u.shape[1] != v.shape[0]):
                raise ValueError(
                    f"U {tuple(u.shape)} does not match V {tuple(v.shape)} (U is [out, r], V [r, in])"
                )

    @property
    def out_features(self) -> int:
        return sum(self.part_rows())

    @property
    def in_features(self) -> int:
        return self.vs[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.vs[0].device

    def part_rows(self) -> list[int]:
        return [(v if u is None else u).shape[0] for u, v in zip(self.us, self.vs)]

    def ranks(self) -> list[int | None]:
        """Each part's rank; None for a part kept whole."""
        return [None if u is None else u.shape[1] for u in self.us]

    def num_parameters(self) -> int:
        return sum(v.numel() + (u.numel() if u is not None else 0) for u, v in zip(self.us, self.vs))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        blocks = [v.float() if u is None else u.float() @ v.float() for u, v in zip(self.us, self.vs)]
        return torch.cat(blocks).to(dtype)

    def to(self, device: torch.device | str) -> LowRankWeight:
        us = tuple(None if u is None else u.to(device) for u in self.us)
        return LowRankWeight(us, tuple(v.to(device) for v in self.vs))

    def nbytes(self) -> int:
        tensors = [t for t in (*self.us, *self.vs) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def rows(self, start: int, stop: int) -> LowRankWeight:
        if not 0 <= start <= stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) outside a weight of {self.out_features} rows")
        if start == stop:  # no rows: the first part, emptied
            u, v = self.us[0], self.vs[0]
            return LowRankWeight((None if u is None else u[:0],), (v[:0] if u is None else v,))
        us, vs, offset = [], [], 0
        for u, v, rows in zip(self.us, self.vs, self.part_rows()):
            lo, hi = max(start, offset) - offset, min(stop, offset + rows) - offset
            if lo < hi:
                us.append(None if u is None else u[lo:hi])
                vs.append(v[lo:hi] if u is None else v)  # all of a part's rows share its V
            offset += rows
        return LowRankWeight(tuple(us), tuple(vs))

    @classmethod
    def cat_rows(cls, parts: list[LowRankWeight]) -> LowRankWeight:
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("cannot fuse low-rank weights of different in_features")
        return LowRankWeight(tuple(u for p in parts for u in p.us), tuple(v for p in parts for v in p.vs))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"v{i}": v for i, v in enumerate(self.vs)}
        tensors.update({f"u{i}": u for i, u in enumerate(self.us) if u is not None})
        return tensors, {"parts": len(self.vs)}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> LowRankWeight:
        parts = int(metadata["parts"])
        return cls(
            tuple(tensors.get(f"u{i}") for i in range(parts)), tuple(tensors[f"v{i}"] for i in range(parts))
        )
