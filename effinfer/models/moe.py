"""Mixture-of-Experts decoders: Mixtral (Jiang et al. 2024, "Mixtral of Experts"), Qwen2-MoE
(Qwen Team 2024, Qwen1.5-MoE) and Qwen3-MoE (Qwen Team 2025, Qwen3 Technical Report).

Each is a Llama decoder (``models/llama.py``: attention, norms, rotary, paged cache) whose MLP is a
sparse MoE block (``layers/moe.py``): a float32 router picks the top k of E experts per token and
their gated MLPs' outputs are summed with the router's weights. The three differ only in the
config: Mixtral renormalises the top-k weights and routes in every layer; Qwen renormalises when
``norm_topk_prob``, routes in the layers ``decoder_sparse_step`` selects (a dense MLP in the others
and in ``mlp_only_layers``); Qwen2-MoE adds a shared expert scaled by a sigmoid gate and q/k/v
biases, Qwen3-MoE per-head q/k RMSNorm. Switched on by loading such a checkpoint (HF directory with
per-expert or transformers-5 stacked expert tensors, a ``qwen2moe`` / ``qwen3moe`` GGUF file, or a
``llama`` GGUF file with experts, which is how llama.cpp writes Mixtral).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.linear import Linear
from effinfer.layers.moe import FloatLinear, SparseMoE, TopKRouter
from effinfer.layers.norm import RMSNorm
from effinfer.models.base import CausalLM, SmoothingPair, architecture_in, common_hf_fields
from effinfer.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    attention_smoothing_pairs,
    unpermute_rotary_rows,
)

MIXTRAL, QWEN2_MOE, QWEN3_MOE = "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"


@dataclass
class MoeConfig(ModelConfig):
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # each expert's MLP width; 0: ``intermediate_size``
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to one
    # Per layer: True for a sparse MoE block, False for a dense MLP of ``intermediate_size``.
    sparse_layers: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.moe_intermediate_size:
            self.moe_intermediate_size = self.intermediate_size
        if not self.sparse_layers:
            self.sparse_layers = [True] * self.num_layers
        if len(self.sparse_layers) != self.num_layers:
            raise ConfigError(f"{len(self.sparse_layers)} sparse-layer flags for {self.num_layers} layers")
        for name in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        ):
            value, least = getattr(self, name), 0 if name.startswith("shared") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )


def sparse_moe_block(config: MoeConfig) -> SparseMoE:
    """A layer's experts (gated MLPs of ``moe_intermediate_size``), router and optional shared expert."""
    hidden = config.hidden_size
    expert_config = dataclasses.replace(config, intermediate_size=config.moe_intermediate_size)
    router = TopKRouter(hidden, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob)
    experts = nn.ModuleList(LlamaMLP(expert_config) for _ in range(config.num_experts))
    shared, shared_gate = None, None
    if config.shared_expert_intermediate_size:
        shared = LlamaMLP(
            dataclasses.replace(config, intermediate_size=config.shared_expert_intermediate_size)
        )
        shared_gate = FloatLinear(hidden, 1)
    return SparseMoE(router, experts, shared, shared_gate)


class MoeDecoderLayer(nn.Module):
    """Llama's layer (pre-norm attention, pre-norm MLP) with a sparse MoE block or a dense MLP as ``mlp``."""

    forward = LlamaDecoderLayer.forward

    def __init__(self, config: MoeConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = sparse_moe_block(config) if config.sparse_layers[layer_index] else LlamaMLP(config)


# Mixtral's checkpoint names -> the Qwen/HF-5 names this module's parameters follow.
_MIXTRAL_NAMES = {
    ".block_sparse_moe.": ".mlp.",
    ".w1.": ".gate_proj.",
    ".w3.": ".up_proj.",
    ".w2.": ".down_proj.",
}
# Experts stacked [E, ...] in one tensor: transformers 5's gate_up_proj [E, 2I, hidden] and down_proj
# [E, hidden, I]; llama.cpp's ffn_{gate,up,down}_exps (named *_exps here: the GGUF loader hands such
# a stack over as one float tensor, or as a list of per-expert quantized weights when its blocks can
# run as they are). ``checkpoint_tensors`` splits them per expert.
_STACKED_EXPERTS = re.compile(
    r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj|gate_exps|up_exps|down_exps)(\.weight)?"
)
_STACKED_PROJECTIONS = {"gate_exps": "gate_proj", "up_exps": "up_proj", "down_exps": "down_proj"}

# llama.cpp's MoE tensors: the router, the stacked experts, Qwen2-MoE's shared expert and its gate.
_GGUF_LAYER_TENSORS = {
    **CausalLM.gguf_layer_tensors,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_exps",
    "ffn_up_exps": "mlp.experts.up_exps",
    "ffn_down_exps": "mlp.experts.down_exps",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GGUF_NAMES = {QWEN2_MOE: "qwen2moe", QWEN3_MOE: "qwen3moe", MIXTRAL: "llama"}
# llama.cpp writes Mixtral as a ``llama`` file with ``llama.expert_count`` and permuted q/k rows.
_MIXTRAL_GGUF = "llama"


class MoeForCausalLM(CausalLM):
    hf_architectures = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
    gguf_architectures = (_GGUF_NAMES[QWEN2_MOE], _GGUF_NAMES[QWEN3_MOE])
    gguf_expert_architectures = (_MIXTRAL_GGUF,)
    gguf_layer_tensors = _GGUF_LAYER_TENSORS
    packed_modules = LlamaForCausalLM.packed_modules
    # The causal-LM plumbing is Llama's.
    tie_weights = LlamaForCausalLM.tie_weights
    forward = LlamaForCausalLM.forward
    supports_pipeline = True
    compute_logits = LlamaForCausalLM.compute_logits
    cache_specs = LlamaForCausalLM.cache_specs
    decoder_layers = LlamaForCausalLM.decoder_layers

    config: MoeConfig

    def __init__(self, config: MoeConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        self.model = LlamaModel(config, max_positions, MoeDecoderLayer)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tie_weights()

    # ---------------------------------------------------------------- configs

    @classmethod
    def config_from_hf(cls, hf: dict) -> MoeConfig:
        arch = architecture_in(hf, cls.hf_architectures)
        fields = common_hf_fields(hf, arch)
        layers = fields["num_layers"]
        if arch == MIXTRAL:
            fields["sliding_windows"] = [hf.get("sliding_window") or None] * layers
            return MoeConfig(
                **fields,
                num_experts=hf.get("num_local_experts", 8),
                num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                norm_topk_prob=True,
            )
        qwen3 = arch == QWEN3_MOE
        fields["qk_norm"] = qwen3
        if not qwen3:  # Qwen2-MoE's q/k/v bias flag (a GGUF file says attention_bias)
            fields["attention_bias"] = bool(hf.get("qkv_bias", hf.get("attention_bias", True)))
        fields["sliding_windows"] = _qwen_sliding_windows(hf, qwen3, layers)
        step = hf.get("decoder_sparse_step", 1)
        if not isinstance(step, int) or step < 1:
            raise ConfigError(f"decoder_sparse_step must be a positive integer, got {step!r}")
        dense = set(hf.get("mlp_only_layers") or [])
        num_experts = hf.get("num_experts", hf.get("num_local_experts", 128 if qwen3 else 60))
        return MoeConfig(
            **fields,
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 8 if qwen3 else 4),
            moe_intermediate_size=hf.get("moe_intermediate_size", 768 if qwen3 else 1408),
            shared_expert_intermediate_size=0 if qwen3 else hf.get("shared_expert_intermediate_size", 5632),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            sparse_layers=[i not in dense and (i + 1) % step == 0 for i in range(layers)],
        )

    @classmethod
    def hf_config_from_gguf(cls, arch: str, key: Callable[[str, Any], Any]) -> dict[str, Any]:
        """llama.cpp's ``qwen2moe`` / ``qwen3moe`` / ``llama`` (Mixtral) keys: expert count, experts
        per token, widths."""
        hf = super().hf_config_from_gguf(arch, key)
        hf.update(
            num_experts=key("expert_count", None),
            num_local_experts=key("expert_count", None),  # Mixtral's name
            num_experts_per_tok=key("expert_used_count", None),
            moe_intermediate_size=key("expert_feed_forward_length", None),
            # llama.cpp's converter does not store Qwen3-MoE's norm_topk_prob; its graph renormalises.
            norm_topk_prob=arch == "qwen3moe",
        )
        if arch == "qwen2moe":
            hf["shared_expert_intermediate_size"] = key("expert_shared_feed_forward_length", 0)
        # A dense MLP width only matters for dense layers, which llama.cpp's converted files do not have.
        hf["intermediate_size"] = hf["intermediate_size"] or hf["moe_intermediate_size"]
        return hf

    @classmethod
    def hf_architecture_for_gguf(cls, arch: str) -> str:
        return next(hf for hf, gguf in _GGUF_NAMES.items() if gguf == arch)

    @classmethod
    def gguf_tensor(cls, name: str, tensor, config: ModelConfig) -> tuple[str, Any] | None:
        """llama.cpp stores the shared-expert gate as a vector (HF: a [1, hidden] projection) and, for
        Mixtral, q/k rows permuted as for a Llama."""
        mapped = super().gguf_tensor(name, tensor, config)
        if mapped is None:
            return None
        hf_name, tensor = mapped
        if ".ffn_gate_inp_shexp." in name and isinstance(tensor, torch.Tensor):
            tensor = tensor.reshape(1, -1)
        elif config.architecture == MIXTRAL and ".self_attn.q_proj." in hf_name:
            tensor = unpermute_rotary_rows(tensor, config.num_heads)
        elif config.architecture == MIXTRAL and ".self_attn.k_proj." in hf_name:
            tensor = unpermute_rotary_rows(tensor, config.num_kv_heads)
        return hf_name, tensor

    # ---------------------------------------------------------------- checkpoint names

    def checkpoint_tensors(self, tensors: Iterable[tuple[str, Any, int]]) -> Iterable[tuple[str, Any, int]]:
        """Stacked experts (transformers 5's [E, 2I, hidden] gate_up_proj / [E, hidden, I] down_proj,
        llama.cpp's gate / up / down stacks, float or a list of quantized per-expert weights) as one
        tensor per expert and projection."""
        for name, tensor, nbytes in tensors:
            match = _STACKED_EXPERTS.fullmatch(name)
            stacked = isinstance(tensor, list) or (isinstance(tensor, torch.Tensor) and tensor.dim() == 3)
            if match is None or not stacked:
                yield name, tensor, nbytes
                continue
            prefix, projection = match[1], match[2]
            for expert, weight in enumerate(tensor):
                read = nbytes if expert == 0 else 0
                if projection == "gate_up_proj":
                    gate, up = weight.chunk(2, dim=0)
                    yield f"{prefix}.{expert}.gate_proj.weight", gate, read
                    yield f"{prefix}.{expert}.up_proj.weight", up, 0
                else:
                    projection = _STACKED_PROJECTIONS.get(projection, projection)
                    yield f"{prefix}.{expert}.{projection}.weight", weight, read

    def checkpoint_target(self, name: str) -> tuple[str, int] | None:
        for mixtral, ours in _MIXTRAL_NAMES.items():
            name = name.replace(mixtral, ours)
        return super().checkpoint_target(name)

    # ---------------------------------------------------------------- what compression sees

    def smoothing_pairs(self, layer: MoeDecoderLayer) -> list[SmoothingPair]:
        """A dense layer's pairs are Llama's. A sparse layer's post-attention norm also feeds the
        float router, and each expert sees only the tokens routed to it, so only attention is paired."""
        if isinstance(layer.mlp, SparseMoE):
            return attention_smoothing_pairs(layer)
        return LlamaForCausalLM.smoothing_pairs(self, layer)


def _qwen_sliding_windows(hf: dict, qwen3: bool, num_layers: int) -> list[int | None]:
    """Per layer, the sliding window or None, as transformers builds Qwen2-MoE / Qwen3-MoE masks."""
    window = hf.get("sliding_window")
    if not hf.get("use_sliding_window", False) or not window:
        return [None] * num_layers
    if qwen3:  # every layer slides
        return [window] * num_layers
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < hf.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    return [window if t == "sliding_attention" else None for t in layer_types]
