"""The Llama family: Llama 2 / 3 / 3.1 / 3.2, Mistral, Qwen2 / 2.5 and Qwen3 in one file.

They share one decoder block (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP);
their differences are config flags: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied
embeddings, Llama 3 rope scaling, sliding-window layers (Mistral). The model works on a flat
batch of tokens from many sequences; paging and batching live in ``engine/`` and ``layers/``.
"""

from __future__ import annotations

import torch
from torch import nn

from effinfer.config import ModelConfig
from effinfer.layers.activation import gated, get_activation
from effinfer.layers.attention import AttentionMetadata, DenseCausal, PagedAttention
from effinfer.layers.attention_sinks import cache_positions
from effinfer.layers.cache_spec import AttentionCacheSpec
from effinfer.layers.linear import Linear
from effinfer.layers.norm import RMSNorm
from effinfer.layers.rotary import RotaryEmbedding, apply_rotary_


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size)
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
            config.attention_sinks,
        )
        self._split = [q_size, kv_size, kv_size]

    def forward(
        self, x: torch.Tensor, cos_sin: tuple, meta: AttentionMetadata, sink_cos_sin: tuple | None = None
    ) -> torch.Tensor:
        """``sink_cos_sin``: with attention sinks, the rotation at each query's cache position."""
        qkv = self.qkv_proj(x)
        num_tokens, (q_size, kv_size, _) = qkv.shape[0], self._split
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
        self.gate_up_proj = Linear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
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
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # One rotary table for every layer (a buffer, built after loading).
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_sinks = config.attention_sinks
        self.sliding_window = config.sliding_windows[0] if config.attention_sinks else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions)
        sink_cos_sin = None
        if self.attention_sinks:
            sink_cos_sin = self.rotary(cache_positions(positions, self.attention_sinks, self.sliding_window))
        for layer in self.layers:
            x = layer(x, cos_sin, meta, sink_cos_sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our fused parameter's module name, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output projection; redone after ``to_empty``, which unties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of every token; ``compute_logits`` projects the ones that are sampled."""
        return self.model(input_ids, positions, meta)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, hidden] of whole sequences without the KV cache: training and scoring."""
        batch, seq_len = input_ids.shape
        positions = torch.arange(seq_len, device=input_ids.device).repeat(batch)
        hidden = self.model(input_ids.reshape(-1), positions, DenseCausal(batch, seq_len))
        return hidden.view(batch, seq_len, -1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def cache_specs(self) -> list[AttentionCacheSpec]:
        """What each decoder layer caches per sequence (the engine sizes and frees KV from these)."""
        sinks = self.config.attention_sinks
        return [AttentionCacheSpec(w, sinks if w else 0) for w in self.config.sliding_windows]

    def checkpoint_target(self, name: str) -> tuple[str, int] | None:
        """Map a checkpoint tensor name to (our parameter name, shard); None for tensors we do not use."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        for ckpt_name, (ours, shard) in self.packed_modules.items():
            if f".{ckpt_name}." in name:
                return name.replace(f".{ckpt_name}.", f".{ours}."), shard
        return name, 0
