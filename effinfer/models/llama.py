"""The Llama family: Llama 2 / 3 / 3.1 / 3.2, Mistral, Qwen2 / 2.5 and Qwen3 in one file.

They share one decoder block (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP);
their differences are config flags: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied
embeddings, Llama 3 rope scaling, sliding-window layers (Mistral). The model works on a flat
batch of tokens from many sequences; paging and batching live in ``engine/`` and ``layers/``.
What the rest of effinfer asks a model (configs, checkpoint names, the Linears compression
rewrites, cache specs) is ``models/base.py``'s ``CausalLM`` interface.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from effinfer.config import ModelConfig
from effinfer.layers.activation import gated, get_activation
from effinfer.layers.attention import AttentionMetadata, PagedAttention
from effinfer.layers.attention_sinks import cache_positions
from effinfer.layers.cache_spec import AttentionCacheSpec
from effinfer.layers.norm import RMSNorm
from effinfer.layers.parallel import (
    column_linear,
    head_split,
    qkv_linear,
    row_linear,
    vocab_embedding,
    vocab_head,
)
from effinfer.layers.rotary import RotaryEmbedding, apply_rotary_
from effinfer.models.base import CausalLM, SmoothingPair, architecture_in, common_hf_fields
from effinfer.quant.affine import AffineGroupWeight
from effinfer.quant.integer import QuantizedWeight


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        heads = head_split(config.num_heads, config.num_kv_heads)  # this rank's, under tensor parallelism
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv_proj = qkv_linear(config.hidden_size, heads, self.head_dim, config.attention_bias)
        self.o_proj = row_linear(config.num_heads * self.head_dim, config.hidden_size)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            config.sliding_windows[layer_index],
            sink_tokens=config.attention_sinks,
        )

    def forward(
        self, x: torch.Tensor, cos_sin: tuple, meta: AttentionMetadata, sink_cos_sin: tuple | None = None
    ) -> torch.Tensor:
        """``sink_cos_sin``: with attention sinks, the rotation at each query's cache position."""
        qkv = self.qkv_proj(x)
        if self.q_norm is None and sink_cos_sin is None:
            out = self.attn.decode_block(qkv, cos_sin, meta)  # one fused call on CPU decode steps
            if out is not None:
                return self.o_proj(out)
        num_tokens, (q_size, kv_size, _) = qkv.shape[0], self.qkv_proj.shard_sizes
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qk = qkv[:, : q_size + kv_size].view(num_tokens, heads + kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].view(num_tokens, kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
        # Attention sinks score the sink keys with the query at its cache position (a second rotation).
        q_at_cache = None if sink_cos_sin is None else apply_rotary_(qk[:, :heads].clone(), sink_cos_sin)
        q, k = apply_rotary_(qk, cos_sin).split([heads, kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, meta, q_at_cache))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = column_linear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = row_linear(config.intermediate_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.gate_up_proj(x), self.act))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple, meta: AttentionMetadata, sink_cos_sin: tuple | None = None
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos_sin, meta, sink_cos_sin)
        h, x = self.post_attention_layernorm(h, residual=x)  # x + attention, and its norm
        return x + self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, max_positions: int, decoder_layer: type[nn.Module] = LlamaDecoderLayer
    ) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        # One rotary table for every layer (a buffer, built after loading).
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(decoder_layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_sinks = config.attention_sinks
        self.sliding_window = config.sliding_windows[0] if config.attention_sinks else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if hidden_states is None else hidden_states
        cos_sin = self.rotary(positions)
        sink_cos_sin = None
        if self.attention_sinks:
            sink_cos_sin = self.rotary(cache_positions(positions, self.attention_sinks, self.sliding_window))
        for layer in self.layers:
            x = layer(x, cos_sin, meta, sink_cos_sin)
        return self.norm(x)


# HF architectures name -> the GGUF architecture llama.cpp stores it as. Only llama.cpp's `llama`
# interleaves the rotary pairs of q/k rows (its converter permutes them; HF rotates halves).
_GGUF_NAMES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_PERMUTED_GGUF = "llama"


class LlamaForCausalLM(CausalLM):
    hf_architectures = tuple(_GGUF_NAMES)
    supports_tensor_parallel = True
    supports_pipeline = True
    gguf_architectures = tuple(dict.fromkeys(_GGUF_NAMES.values()))
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        self.model = LlamaModel(config, max_positions)
        self.lm_head = vocab_head(config.hidden_size, config.vocab_size)
        self.tie_weights()

    # ---------------------------------------------------------------- configs

    def decode_plan(self, device: torch.device, dtype: torch.dtype):
        """Decode steps as a flat loop of kernel calls on the CPU (``models/cpu_decode_plan.py``)."""
        from effinfer.models.cpu_decode_plan import CpuDecodePlan  # it names this file's classes

        return CpuDecodePlan.for_model(self, device, dtype)

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        arch = architecture_in(hf, cls.hf_architectures)
        fields = common_hf_fields(hf, arch)
        is_qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
        if arch == "Qwen2ForCausalLM":  # Qwen2 has q/k/v biases whether or not config.json says so
            fields["attention_bias"] = bool(hf.get("attention_bias", True))
        fields["qk_norm"] = arch == "Qwen3ForCausalLM"
        fields["sliding_windows"] = _sliding_windows(hf, is_qwen, fields["num_layers"])
        return ModelConfig(**fields)

    @classmethod
    def hf_architecture_for_gguf(cls, arch: str) -> str:
        return next(hf for hf, gguf in _GGUF_NAMES.items() if gguf == arch)

    @classmethod
    def gguf_architecture_for(cls, hf_architecture: str) -> str | None:
        return _GGUF_NAMES.get(hf_architecture)

    @classmethod
    def gguf_tensor(cls, name: str, tensor, config: ModelConfig):
        mapped = super().gguf_tensor(name, tensor, config)
        if mapped is None or cls.gguf_architecture_for(config.architecture) != _PERMUTED_GGUF:
            return mapped
        hf_name, tensor = mapped
        if ".self_attn.q_proj." in hf_name:
            tensor = unpermute_rotary_rows(tensor, config.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            tensor = unpermute_rotary_rows(tensor, config.num_kv_heads)
        return hf_name, tensor

    @classmethod
    def hf_tensor_to_gguf(cls, hf_name: str, tensor: torch.Tensor, config: ModelConfig):
        mapped = super().hf_tensor_to_gguf(hf_name, tensor, config)
        if mapped is None or cls.gguf_architecture_for(config.architecture) != _PERMUTED_GGUF:
            return mapped
        name, tensor = mapped
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            tensor = permute_rotary_rows(tensor, config.num_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            tensor = permute_rotary_rows(tensor, config.num_kv_heads)
        return name, tensor

    # ---------------------------------------------------------------- the math

    def tie_weights(self) -> None:
        """Share the embedding with the output projection; redone after ``to_empty``, which unties them."""
        holds_head = self.pipeline_stage is None or self.pipeline_stage.is_last
        if self.config.tie_word_embeddings and holds_head:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of every token; ``compute_logits`` projects the ones that are sampled.
        ``hidden_states``: a later pipeline stage's input (``CausalLM.forward``)."""
        return self.model(input_ids, positions, meta, hidden_states)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def cache_specs(self) -> list[AttentionCacheSpec]:
        """What each decoder layer caches per sequence (the engine sizes and frees KV from these)."""
        sinks = self.config.attention_sinks
        return [AttentionCacheSpec(w, sinks if w else 0) for w in self.config.sliding_windows]

    # ---------------------------------------------------------------- what compression sees

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def smoothing_pairs(self, layer: LlamaDecoderLayer) -> list[SmoothingPair]:
        """input_layernorm -> q/k/v, v rows -> o_proj, post_attention_layernorm -> gate/up, up rows -> down."""
        mlp = layer.mlp
        inter = mlp.down_proj.in_features
        return [
            *attention_smoothing_pairs(layer),
            SmoothingPair("gate_up", layer.post_attention_layernorm, (mlp.gate_up_proj,), mlp),
            SmoothingPair(
                "down", mlp.gate_up_proj, (mlp.down_proj,), mlp.down_proj, prev_rows=slice(inter, 2 * inter)
            ),
        ]


def attention_smoothing_pairs(layer: LlamaDecoderLayer) -> list[SmoothingPair]:
    """input_layernorm -> q/k/v and v rows -> o_proj of a Llama-style decoder layer."""
    attn = layer.self_attn
    q_size, kv_size, v_size = attn.qkv_proj.shard_sizes
    return [
        SmoothingPair("qkv", layer.input_layernorm, (attn.qkv_proj,), attn, block_takes_layer_args=True),
        # Attention is linear in v: scaling a v channel scales the same channel of every query
        # head of its group at o_proj's input.
        SmoothingPair(
            "o",
            attn.qkv_proj,
            (attn.o_proj,),
            attn.o_proj,
            prev_rows=slice(q_size + kv_size, q_size + kv_size + v_size),
            fanout=attn.num_heads // attn.num_kv_heads,
            fanout_width=attn.head_dim,
        ),
    ]


def _sliding_windows(hf: dict, is_qwen: bool, num_layers: int) -> list[int | None]:
    """Per layer, the window of a sliding-window layer, None for full attention."""
    window = hf.get("sliding_window")
    if is_qwen and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return [None] * num_layers
    layer_types = hf.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if is_qwen:
        first_sliding = hf.get("max_window_layers", num_layers)
        return [window if i >= first_sliding else None for i in range(num_layers)]
    return [window] * num_layers


def _swap_rotary_pairs(weight: torch.Tensor, num_heads: int, from_interleaved: bool) -> torch.Tensor:
    rows = weight.shape[0]
    halves = (2, rows // num_heads // 2) if not from_interleaved else (rows // num_heads // 2, 2)
    return weight.reshape(num_heads, *halves, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF layout -> llama.cpp layout: within each head, rotary pairs (i, i + d/2) become adjacent rows."""
    return _swap_rotary_pairs(weight, num_heads, from_interleaved=False)


def unpermute_rotary_rows(weight, num_heads: int):
    """llama.cpp layout -> HF layout (the inverse of ``permute_rotary_rows``), of a float tensor or of a
    ``QuantizedWeight`` / ``AffineGroupWeight`` (codes, scales, zeros or offsets move with their rows)."""
    if isinstance(weight, AffineGroupWeight):
        order = unpermute_rotary_rows(torch.arange(weight.out_features), num_heads)
        return weight.index_rows(order)
    if isinstance(weight, QuantizedWeight):
        per_row = ("qweight", "scales", "zeros", "offsets")
        moved = {
            f: unpermute_rotary_rows(getattr(weight, f), num_heads) for f in per_row if hasattr(weight, f)
        }
        return dataclasses.replace(weight, **moved)
    return _swap_rotary_pairs(weight, num_heads, from_interleaved=True)
