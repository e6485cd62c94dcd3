"""The switch for the fused Triton operators of a decoder layer on CUDA.

Paper: the operator fusion of the survey's "graph and operator optimization" (Zhou et al. 2024),
done the way vLLM and gpt-fast do on GPUs. Idea: outside the matrix products a decode step is a
few dozen tiny kernels per layer (casts, reductions, gathers); one Triton kernel each for RMSNorm
with the residual add (``fused_rms_norm``), rotary embedding in place (``fused_rotary``),
SiLU-and-multiply (``silu_mul``), the paged KV store (``paged_kv_store``), paged decode attention
(``paged_decode_attention``) and varlen prefill attention (``varlen_prefill_attention``).

Switch on: automatic for CUDA tensors at inference when Triton is importable; ``EFFINFER_TRITON_OPS=0``
turns every one of them off (the layers then run their PyTorch reference). CPU tensors never
come here: the CPU paths stay as they are.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import SimpleNamespace

import torch

logger = logging.getLogger(__name__)

SWITCH = "EFFINFER_TRITON_OPS"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MODULES = (
    "fused_rms_norm",
    "fused_rotary",
    "silu_mul",
    "paged_kv_store",
    "paged_decode_attention",
    "varlen_prefill_attention",
)


@functools.cache
def kernels() -> SimpleNamespace | None:
    """The kernel modules by name, or None when switched off, Triton does not import, or the
    kernels fail their start-up check on this GPU (logged: the layers then run PyTorch).

    Imported on the first CUDA tensor only: importing Triton costs seconds, and CPU runs never
    need it. The switch is read once per process (``kernels.cache_clear()`` re-reads it).
    """
    if os.environ.get(SWITCH, "1") == "0":
        logger.info("%s=0: the layers run their PyTorch paths on CUDA", SWITCH)
        return None
    try:
        loaded = SimpleNamespace(
            **{name: importlib.import_module(f"effinfer.kernels.triton.{name}") for name in MODULES}
        )
    except ImportError as error:
        logger.warning(
            "no Triton operators (%s: %s): the layers run their PyTorch paths", type(error).__name__, error
        )
        return None
    if torch.cuda.is_available():
        problem = self_test(loaded, torch.device("cuda"), torch.bfloat16)
        if problem is not None:
            logger.warning("Triton operators off: %s; the layers run their PyTorch paths", problem)
            return None
    return loaded


def self_test(ops: SimpleNamespace, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run every kernel once on tiny inputs against PyTorch; what went wrong, or None.

    A kernel that does not compile on this GPU or Triton version (or computes nonsense) turns the
    operators off with a warning instead of failing the first request.
    """
    try:
        with torch.inference_mode():
            return _check_kernels(ops, device, dtype)
    except Exception as error:  # a compile or launch failure of any kind
        return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _check_kernels(ops: SimpleNamespace, device: torch.device, dtype: torch.dtype) -> str | None:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    def far(result, expected, name):
        err = (result.float() - expected.float()).abs().max().item()
        return (
            f"{name} is off by {err:.3g}"
            if not err <= 0.05 * max(expected.float().abs().max().item(), 1)
            else None
        )

    x, residual, weight = rand(3, 48), rand(3, 48), rand(48)
    total = x + residual
    normed = weight * (total.float() * torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(
        dtype
    )
    problems = [far(ops.fused_rms_norm.rms_norm(x, weight, 1e-6, residual)[0], normed, "rms_norm")]
    gate_up = rand(3, 64)
    gate, up = gate_up.float().chunk(2, dim=-1)
    problems.append(
        far(ops.silu_mul.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, "silu_and_mul")
    )
    qk, angles = rand(3, 4, 16), torch.rand(3, 8, generator=g).to(device)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    rotated = (
        qk.float() * cos[:, None].float()
        + torch.cat([-qk[..., 8:], qk[..., :8]], -1).float() * sin[:, None].float()
    )
    problems.append(far(ops.fused_rotary.rotary_(qk, cos, sin), rotated, "rotary_"))
    # Attention: 2 sequences of 5 and 20 tokens, all written by the store kernel; MHA and GQA 4.
    for heads, kv_heads in ((2, 2), (8, 2)):
        k_cache, v_cache = rand(4, 16, kv_heads, 32) * 0, rand(4, 16, kv_heads, 32) * 0
        keys, values, q = rand(25, kv_heads, 32), rand(25, kv_heads, 32), rand(25, heads, 32)
        tables = torch.tensor([[3, 0], [1, 2]], device=device)
        slots = torch.tensor([48 + i for i in range(5)] + [16 + i for i in range(20)], device=device)
        ops.paged_kv_store.store_kv(keys, values, k_cache, v_cache, slots)
        starts, lens = torch.tensor([0, 5, 25], device=device), torch.tensor([5, 20], device=device)
        prefill = ops.varlen_prefill_attention.prefill_attention(
            q, k_cache, v_cache, tables, starts, lens, 20, 32**-0.5
        )
        decode = ops.paged_decode_attention.decode_attention(
            q[[4, 24]], k_cache, v_cache, tables, lens, 32**-0.5, partition_size=16
        )
        for rows, name in ((slice(0, 5), "prefill"), (slice(5, 25), "prefill")):
            qs, ks, vs = (t[rows].float().transpose(0, 1) for t in (q, keys, values))
            ks, vs = (t.repeat_interleave(heads // kv_heads, 0) for t in (ks, vs))
            expected = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(
                0, 1
            )
            problems.append(far(prefill[rows], expected, f"{name} attention ({heads}/{kv_heads} heads)"))
            problems.append(
                far(
                    decode[0 if rows.start == 0 else 1],
                    expected[-1],
                    f"decode attention ({heads}/{kv_heads} heads)",
                )
            )
    return next((p for p in problems if p is not None), None)


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` goes to the Triton operators: a CUDA bf16 / fp16 / fp32 tensor at inference."""
    return x.is_cuda and x.dtype in DTYPES and not torch.is_grad_enabled() and kernels() is not None
