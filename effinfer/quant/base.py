"""The protocol every compressed weight follows, so layers, loaders and kernels need no per-scheme code.

A ``CompressedWeight`` stands for a float matrix [out_features, in_features]. Its
``reference_linear`` is the definition of the product (every kernel is tested against it),
``dequantize`` the float matrix, ``rows`` / ``cat_rows`` split and join output rows (fused
q/k/v and gate/up, tensor-parallel shards), and ``state_dict`` / ``from_state_dict`` save and
load it as a flat dict of tensors plus a small JSON-serializable metadata dict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from effinfer.quant.activations import fake_quantize_activations


class CompressedWeight(ABC):
    """A weight matrix stored in some compressed form (see the module docstring)."""

    # The weight type's name in checkpoints' metadata and the registry.
    kind: ClassVar[str]
    # True when ``reference_linear`` without activation quantization is x @ dequantize()^T + b, so a
    # layer without a kernel can run the dequantized matrix on the dense path.
    dense_equivalent: ClassVar[bool] = True

    @property
    @abstractmethod
    def out_features(self) -> int: ...

    @property
    @abstractmethod
    def in_features(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] the stored form stands for."""

    @abstractmethod
    def to(self, device: torch.device | str) -> CompressedWeight: ...

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the stored form, as a checkpoint holds it and a kernel streams it."""

    @abstractmethod
    def rows(self, start: int, stop: int) -> CompressedWeight:
        """Output rows [start, stop)."""

    @classmethod
    @abstractmethod
    def cat_rows(cls, parts: list[CompressedWeight]) -> CompressedWeight:
        """Stack weights along the output dimension (the inverse of ``rows``)."""

    @abstractmethod
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata): what ``from_state_dict`` needs to rebuild the weight exactly."""

    @classmethod
    @abstractmethod
    def from_state_dict(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
    ) -> CompressedWeight: ...

    def reference_linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, act_quant: str | None = None
    ) -> torch.Tensor:
        """y = x' @ W^T + b in fp32, x' being ``x`` fake-quantized when ``act_quant`` is set (W8A8)."""
        xf = fake_quantize_activations(x, act_quant) if act_quant else x.float()
        b = bias.float() if bias is not None else None
        return F.linear(xf, self.dequantize(torch.float32), b).to(x.dtype)
