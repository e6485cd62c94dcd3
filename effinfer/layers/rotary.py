"""Rotary position embedding (RoPE, Su et al. 2021) with Llama 3 frequency scaling.

RoPE rotates each pair of query/key channels by an angle proportional to the token's position,
so attention scores depend on relative distance. Llama 3's `rope_type: llama3` stretches the
low frequencies by `factor` to extend the context; `linear` divides every frequency.
Pairs are (i, i + d/2), the HF "rotate_half" layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effinfer.kernels.cpu import fused
from effinfer.kernels.triton import gpu_ops


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type") or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build_cache(
        self, device: torch.device, dtype: torch.dtype, freq_factors: torch.Tensor | None = None
    ) -> None:
        """cos/sin tables for every position; ``freq_factors`` divide the frequencies (GGUF's rope_freqs)."""
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.float().reshape(-1).cpu()
        inv_freq = inv_freq.to(device)
        positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        # HF computes cos/sin in float32 and casts to the activation dtype before the product.
        self.cos = angles.cos().to(dtype)
        self.sin = angles.sin().to(dtype)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, [T, 1, head_dim]: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary_(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] in place and return it; queries and keys side by side, so one pass rotates both.

    With cos / sin of a wider dtype than x (mixed precision), the result is a new tensor of that
    dtype, as PyTorch's type promotion gives, and x is left as it was.
    """
    cos, sin = cos_sin
    same_shape = cos.shape[-1] == x.shape[-1] and x.stride(1) == x.shape[2] and x.stride(2) == 1
    if same_shape and cos.dtype == x.dtype:
        if fused.usable(x):
            fused.extension().rotary_(x, cos.squeeze(1), sin.squeeze(1))
            return x
        if gpu_ops.usable(x):
            return gpu_ops.kernels().fused_rotary.rotary_(x, cos, sin)
    rotated = _rotate(x, cos, sin)
    return x.copy_(rotated) if rotated.dtype == x.dtype else rotated


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
