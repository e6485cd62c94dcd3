"""A CPU decode step as a flat list of kernel calls: the CPU's answer to CUDA graphs.

Paper: none; the dispatch overhead that CUDA graphs (``cuda_graphs.py``) and llama.cpp's static
compute graph remove. Idea: a batch-1 decode step of a small model does little arithmetic per
layer — four matrix products, two norms, one attention call, one SiLU·mul, each one C++ call —
but reaching each of those calls goes through nn.Module calls, dtype and device checks and
``None`` tests in Python, ~60-80 µs a layer on this project's 2-core machines, a third of
SmolLM2-135M's step. The plan resolves all of it once: for every Llama-family layer it keeps the
bound kernel calls (``Linear.kernel_call``), the norm weights and the attention layer's cache,
and a decode step runs them in a plain loop. The residual add at the end of each layer moves into
the next layer's fused norm (norm(x + residual), one pass), as vLLM does. The arithmetic is the
eager path's, call for call, so the logits are identical (tests/test_cpu_decode_plan.py).

Used for pure decode steps (one query per sequence) of bf16 Llama / Qwen2 / Mistral models on the
fused CPU kernels: no q/k norm (Qwen3), attention sinks, int8 KV cache, tensor parallelism, or
hooks or instrumented ``forward``s on the layers other than the projections (a projection's
timer or hook is kept: ``Linear.kernel_call`` returns the module path then). The plan is made at
the first decode step, so instrumentation added before it is seen. Everything else, and every
prefill, runs the modules. ``EFFINFER_CPU_DECODE_PLAN=0`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from effinfer.kernels.cpu import fused
from effinfer.layers.attention import FUSED_MAX_HEAD_DIM, AttentionMetadata, PagedAttention
from effinfer.layers.linear import Linear
from effinfer.layers.norm import RMSNorm
from effinfer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel

SWITCH = "EFFINFER_CPU_DECODE_PLAN"


@dataclass
class LayerPlan:
    input_norm: torch.Tensor
    input_eps: float
    post_norm: torch.Tensor
    post_eps: float
    qkv: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]
    attn: PagedAttention


def why_not_plan(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this model's decode steps cannot run as a plan (None: they can)."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if device.type != "cpu" or dtype != torch.bfloat16:
        return "not a bf16 model on the CPU"
    inner = getattr(model, "model", None)
    if type(inner) is not LlamaModel or inner.attention_sinks:
        return "not a Llama-family model without attention sinks"
    if fused.extension() is None:
        return "the fused CPU ops are not available"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (type(layer), type(attn), type(mlp)) != (LlamaDecoderLayer, LlamaAttention, LlamaMLP):
            return "a layer of another kind"
        if attn.q_norm is not None or mlp.act is not F.silu:
            return "q/k norms or an activation other than SiLU"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n) is not RMSNorm or n.weight.dtype != dtype for n in norms):
            return "a norm of another kind or dtype"
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(type(m) is not Linear or not m.prepared for m in linears):
            return "a split (tensor-parallel) or unprepared projection"
        if attn.attn.sink_tokens or attn.attn.head_dim > FUSED_MAX_HEAD_DIM or attn.attn.head_dim % 2:
            return "an attention layout the fused decode kernel does not take"
        for module in layer.modules():
            hooked = module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
            if hooked and not isinstance(module, Linear):
                return "hooks or an instrumented forward on a layer"
        if (
            getattr(attn.attn, "k_scale_cache", None) is not None
            or getattr(attn.attn, "k_cache", None) is None
            or attn.attn.k_cache.dtype != dtype
        ):
            return "an int8 or missing KV cache"
    return None


class CpuDecodePlan:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model: LlamaModel = model.model
        self.ops: Any = fused.extension()
        self.layers = [
            LayerPlan(
                input_norm=layer.input_layernorm.weight,
                input_eps=layer.input_layernorm.eps,
                post_norm=layer.post_attention_layernorm.weight,
                post_eps=layer.post_attention_layernorm.eps,
                qkv=layer.self_attn.qkv_proj.kernel_call(),
                o=layer.self_attn.o_proj.kernel_call(),
                gate_up=layer.mlp.gate_up_proj.kernel_call(),
                down=layer.mlp.down_proj.kernel_call(),
                attn=layer.self_attn.attn,
            )
            for layer in self.model.layers
        ]

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> CpuDecodePlan | None:
        return None if why_not_plan(model, device, dtype) is not None else cls(model)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor | None:
        """The final hidden states [T, hidden] of a decode step, or None where the step needs the modules."""
        if not isinstance(meta, AttentionMetadata) or meta.is_prefill or meta.context_lens_tensor is None:
            return None
        model, ops = self.model, self.ops
        cos, sin = model.rotary(positions)
        if cos.dtype != torch.bfloat16 or cos.shape[-1] != self.layers[0].attn.head_dim:
            return None
        cos, sin = cos.squeeze(1), sin.squeeze(1)
        x = model.embed_tokens(input_ids)
        h, residual = x, None
        for layer in self.layers:
            attn = layer.attn
            if residual is None:
                normed, residual = ops.rms_norm(h, None, layer.input_norm, layer.input_eps)[0], h
            else:
                normed, residual = ops.rms_norm(h, residual, layer.input_norm, layer.input_eps)
            m = meta.for_group(attn.cache_group)  # (the metadata keeps each group's view)
            heads = ops.decode_attention_block(
                layer.qkv(normed), attn.num_heads, attn.num_kv_heads, cos, sin, attn.k_cache, attn.v_cache,
                m.slot_mapping, m.block_tables, m.context_lens_tensor, attn.scale, attn._window,
            )  # fmt: skip
            normed, residual = ops.rms_norm(layer.o(heads), residual, layer.post_norm, layer.post_eps)
            h = layer.down(ops.silu_and_mul(layer.gate_up(normed)))
        return model.norm(h, residual=residual)[0]
