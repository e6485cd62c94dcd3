"""Gemma 3 (Gemma Team 2025, "Gemma 3 Technical Report"): text decoder with interleaved local and global attention.

Most layers attend to a sliding window of recent tokens (the config's ``sliding_window``) and
every ``sliding_window_pattern``-th layer (or as ``layer_types`` lists) to the whole context, so
the KV a long context needs is mostly bounded by the window. Local layers rotate with their own
rope base (``rope_local_base_freq``), global ones with ``rope_theta`` and the rope scaling.
Beyond Llama: per-head q/k RMSNorm; RMSNorm weights stored as offsets from one (``1 + w``); norms
before and after both attention and MLP; GeGLU with tanh GELU; embeddings scaled by
sqrt(hidden); attention scale ``query_pre_attn_scalar ** -0.5``; tied output; optional final
logit soft-capping. Load an HF ``Gemma3ForCausalLM`` directory or a ``gemma3`` GGUF file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.attention import AttentionMetadata, DenseCausal, PagedAttention
from effinfer.layers.linear import Linear
from effinfer.layers.norm import OffsetRMSNorm
from effinfer.layers.rotary import RotaryEmbedding, apply_rotary_
from effinfer.models.base import CausalLM, common_hf_fields
from effinfer.models.llama import LlamaForCausalLM, LlamaMLP


@dataclass
class Gemma3Config(ModelConfig):
    query_pre_attn_scalar: float = 256.0
    rope_local_theta: float = 10000.0  # local (sliding-window) layers; global ones use rope_theta
    final_logit_softcapping: float | None = None
    # Per layer: True for sliding_attention layers (local rope base), also when no window is set.
    local_layers: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.local_layers:
            self.local_layers = [w is not None for w in self.sliding_windows] or [False] * self.num_layers
        if len(self.local_layers) != self.num_layers:
            raise ConfigError(f"{len(self.local_layers)} layer types for {self.num_layers} layers")
        if self.attention_sinks:
            raise ConfigError("attention sinks are implemented for the Llama family, not for Gemma 3")
        if not self.query_pre_attn_scalar > 0:
            raise ConfigError(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")


class Gemma3Attention(nn.Module):
    def __init__(self, config: Gemma3Config, layer_index: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.is_local = config.local_layers[layer_index]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.attention_bias)
        self.q_norm = OffsetRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            config.sliding_windows[layer_index],
            scale=config.query_pre_attn_scalar**-0.5,
        )

    def forward(self, x: torch.Tensor, cos_sin: tuple, meta: AttentionMetadata | DenseCausal) -> torch.Tensor:
        num_tokens, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shard_sizes, dim=-1)
        q = self.q_norm(q.reshape(num_tokens, heads, self.head_dim))
        k = self.k_norm(k.reshape(num_tokens, kv_heads, self.head_dim))
        q, k = apply_rotary_(torch.cat([q, k], dim=1), cos_sin).split([heads, kv_heads], dim=1)
        v = v.reshape(num_tokens, kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3Config, layer_index: int) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(size, eps)
        self.self_attn = Gemma3Attention(config, layer_index)
        self.post_attention_layernorm = OffsetRMSNorm(size, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(size, eps)
        self.mlp = LlamaMLP(config)  # act(gate) * up: GeGLU with config.hidden_act, tanh GELU
        self.post_feedforward_layernorm = OffsetRMSNorm(size, eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple, meta: AttentionMetadata | DenseCausal) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos_sin, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: Gemma3Config, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Two rotary tables (buffers, built by ``prepare``): local layers use no rope scaling.
        head_dim = config.head_dim
        self.local_rotary = RotaryEmbedding(head_dim, max_positions, config.rope_local_theta, None)
        self.global_rotary = RotaryEmbedding(head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)
        # sqrt(hidden) rounded to the model dtype, as HF multiplies by it (set by ``prepare``).
        self.embed_scale = math.sqrt(config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata | DenseCausal,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale if hidden_states is None else hidden_states
        local, global_ = self.local_rotary(positions), self.global_rotary(positions)
        for layer in self.layers:
            x = layer(x, local if layer.self_attn.is_local else global_, meta)
        return self.norm(x)


# llama.cpp's gemma3 tensors beyond the common decoder's: Gemma normalises after attention and
# before and after the MLP (llama.cpp's ``ffn_norm`` is the pre-feedforward norm here).
_GGUF_LAYER_TENSORS = {
    **CausalLM.gguf_layer_tensors,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Gemma's turn format, for GGUF files without ``tokenizer.chat_template``: a system message opens
# the first user turn, the assistant is called "model".
GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set first = messages[0] if messages else none -%}"
    "{%- if first and first['role'] == 'system' -%}"
    "{%- set preamble = first['content'] | trim + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set preamble = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (preamble if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class Gemma3ForCausalLM(CausalLM):
    hf_architectures = ("Gemma3ForCausalLM",)
    gguf_architectures = ("gemma3",)
    gguf_layer_tensors = _GGUF_LAYER_TENSORS
    default_chat_template = GEMMA_TURN_TEMPLATE
    # The causal-LM plumbing is Llama's: fused q/k/v and gate/up checkpoint names, the tied output,
    # a flat batch through the paged cache.
    packed_modules = LlamaForCausalLM.packed_modules
    tie_weights = LlamaForCausalLM.tie_weights
    forward = LlamaForCausalLM.forward

    def __init__(self, config: Gemma3Config, max_positions: int) -> None:
        super().__init__(config, max_positions)
        self.model = Gemma3Model(config, max_positions)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tie_weights()

    # ---------------------------------------------------------------- building from a checkpoint

    @classmethod
    def config_from_hf(cls, hf: dict) -> Gemma3Config:
        """A ``Gemma3Config`` from a Gemma3TextConfig's config.json (transformers 4 or 5 layout)."""
        if hf.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention (EmbeddingGemma) is not supported")
        if hf.get("attn_logit_softcapping") is not None:
            raise ConfigError("attn_logit_softcapping is not supported (Gemma 3 does not use it)")
        heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        global_rope, local_rope = _rope_settings(hf)
        local_layers, window = _local_layers(hf, layers), hf.get("sliding_window")
        fields = common_hf_fields({**hf, "rope_parameters": None, "rope_scaling": None}, "Gemma3ForCausalLM")
        eos = hf.get("eos_token_id", 1)
        fields.update(
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            head_dim=head_dim,
            rope_theta=float(global_rope.pop("rope_theta", 1_000_000.0)),
            rope_scaling=global_rope if global_rope.get("rope_type", "default") != "default" else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            qk_norm=True,
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
            sliding_windows=[window if local else None for local in local_layers],
            bos_token_id=hf.get("bos_token_id", 2),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
        return Gemma3Config(
            **fields,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", head_dim)),
            rope_local_theta=float(local_rope.get("rope_theta", 10000.0)),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            local_layers=local_layers,
        )

    @classmethod
    def hf_config_from_gguf(cls, arch: str, key: Callable[[str, Any], Any]) -> dict:
        """The Gemma-specific config.json fields of a ``gemma3`` GGUF file, as llama.cpp reads them.

        llama.cpp fixes what the file does not store: one global layer in six, local rope base
        10000, and the attention scale 1/sqrt(head_dim) except for the 27B model (62 layers),
        which uses 1/sqrt(hidden / heads).
        """
        layers, hidden, heads = (
            key("block_count", None),
            key("embedding_length", None),
            key("attention.head_count", None),
        )
        head_dim = key("attention.key_length", None) or hidden // heads
        window = key("attention.sliding_window", None) or None
        hf = super().hf_config_from_gguf(arch, key)
        hf.update(
            {
                "head_dim": head_dim,
                "hidden_activation": "gelu_pytorch_tanh",
                "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
                "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
                "rope_local_base_freq": key("rope.freq_base_swa", 10000.0),
                "sliding_window": window,
                # Without a window llama.cpp treats every layer as global, rope base included.
                "sliding_window_pattern": 6 if window else 1,
                "final_logit_softcapping": key("final_logit_softcapping", None) or None,
            }
        )
        return hf

    @classmethod
    def gguf_tensor(cls, name: str, tensor, config: ModelConfig) -> tuple[str, Any] | None:
        """(HF name, tensor in HF's convention) of a GGUF tensor; None if Gemma 3 has no such tensor.

        llama.cpp's converter stores every RMSNorm weight as 1 + w (ggml multiplies by the weight
        as is); HF and ``OffsetRMSNorm`` keep w.
        """
        mapped = super().gguf_tensor(name, tensor, config)
        if mapped is not None and name.endswith("norm.weight"):
            mapped = mapped[0], mapped[1] - 1.0
        return mapped

    def prepare(
        self, device: torch.device, dtype: torch.dtype, rope_freq_factors: torch.Tensor | None = None
    ) -> None:
        """After loading: both rotary tables, and the embedding scale rounded to ``dtype`` as HF rounds it."""
        super().prepare(device, dtype, rope_freq_factors)
        self.model.embed_scale = torch.tensor(math.sqrt(self.config.hidden_size)).to(dtype).item()

    # ---------------------------------------------------------------- running

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---------------------------------------------------------------- what the engine and compress/ ask

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def smoothing_pairs(self, layer: Gemma3DecoderLayer) -> list:
        """None: Gemma's norms multiply by 1 + w, so folding a per-channel scale into a norm's weight
        (what AWQ and SmoothQuant do to Llama's norms) would need w' = (1 + w) / s - 1, which the
        shared scaling code does not do; AWQ / SmoothQuant keep these layers unsmoothed."""
        return []


def _rope_settings(hf: dict) -> tuple[dict, dict]:
    """(global, local) rope settings, each with ``rope_theta`` and, if any, the scaling type and factor.

    transformers 5 writes ``rope_parameters`` per layer type; 4.x wrote ``rope_theta``,
    ``rope_local_base_freq`` and ``rope_scaling`` (which applies to the global layers only).
    """
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        global_rope = dict(params.get("full_attention") or {})
        local_rope = dict(params.get("sliding_attention") or {})
    else:
        global_rope = dict(params or hf.get("rope_scaling") or {})
        global_rope.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        local_rope = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    for rope in (global_rope, local_rope):
        rope.setdefault("rope_type", rope.pop("type", None) or "default")
    if local_rope["rope_type"] != "default":
        raise ConfigError(f"rope scaling on the local layers ({local_rope['rope_type']!r}) is not supported")
    return global_rope, local_rope


def _local_layers(hf: dict, num_layers: int) -> list[bool]:
    """Per layer: True for ``sliding_attention``, False for ``full_attention``."""
    layer_types = hf.get("layer_types")
    if layer_types is None:
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
        ]
    if len(layer_types) != num_layers:
        raise ConfigError(f"layer_types lists {len(layer_types)} layers, the model has {num_layers}")
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConfigError(
            f"unsupported layer type(s) {unknown}; Gemma 3 has sliding_attention and full_attention"
        )
    return [t == "sliding_attention" for t in layer_types]
