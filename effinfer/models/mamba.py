"""Mamba (Gu & Dao 2023): a decoder of selective state-space mixers, with no attention at all.

Each block is RMSNorm -> ``layers/mamba.py``'s mixer -> residual add (kept in float32 when the
config says ``residual_in_fp32``). Every layer caches a fixed-size recurrent state per sequence
(``RecurrentStateSpec``) instead of KV blocks, so the engine hands each running sequence one state
slot; prefix caching cannot reuse such a state and is off for this family. Load an HF
``MambaForCausalLM`` directory (``state-spaces/mamba-*-hf``); GGUF Mamba files are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.attention import DenseCausal
from effinfer.layers.cache_spec import RecurrentMetadata, RecurrentStateSpec
from effinfer.layers.linear import Linear
from effinfer.layers.mamba import MambaMixer
from effinfer.layers.norm import RMSNorm
from effinfer.models.base import CausalLM, SmoothingPair, architecture_in, common_hf_fields


@dataclass
class MambaConfig(ModelConfig):
    state_size: int = 16
    conv_kernel: int = 4
    time_step_rank: int = 1
    use_bias: bool = False
    use_conv_bias: bool = True
    residual_in_fp32: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("state_size", "conv_kernel", "time_step_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


class MambaBlock(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MambaMixer(
            config.hidden_size,
            config.intermediate_size,
            config.state_size,
            config.conv_kernel,
            config.time_step_rank,
            config.use_bias,
            config.use_conv_bias,
        )
        self.residual_in_fp32 = config.residual_in_fp32

    def forward(self, x: torch.Tensor, meta: RecurrentMetadata | DenseCausal) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x.to(self.norm.weight.dtype)), meta)


class MambaModel(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.num_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, meta: RecurrentMetadata | DenseCausal) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return self.norm_f(x.to(self.norm_f.weight.dtype))


class MambaForCausalLM(CausalLM):
    hf_architectures = ("MambaForCausalLM",)
    gguf_architectures = ("mamba",)  # named so the error says why, not that the architecture is unknown

    def __init__(self, config: MambaConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        self.backbone = MambaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.tie_weights()

    # ---------------------------------------------------------------- configs

    @classmethod
    def config_from_hf(cls, hf: dict) -> MambaConfig:
        arch = architecture_in(hf, cls.hf_architectures)
        hidden = hf["hidden_size"]
        rank = hf.get("time_step_rank", "auto")
        # Attention fields are placeholders that pass ModelConfig's checks: no layer attends.
        fields = common_hf_fields(
            {
                **hf,
                "intermediate_size": hf.get("intermediate_size") or int(hf.get("expand", 2) * hidden),
                "num_attention_heads": 1,
                "num_key_value_heads": 1,
                "head_dim": 2,
                "rms_norm_eps": hf.get("layer_norm_epsilon", 1e-5),
                # A recurrent state has no trained length limit; bound it like a long-context model.
                "max_position_embeddings": hf.get("max_position_embeddings") or 1 << 20,
                "tie_word_embeddings": hf.get("tie_word_embeddings", True),
            },
            arch,
        )
        return MambaConfig(
            **fields,
            sliding_windows=[None] * fields["num_layers"],
            state_size=hf.get("state_size", 16),
            conv_kernel=hf.get("conv_kernel", 4),
            time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
            use_bias=bool(hf.get("use_bias", False)),
            use_conv_bias=bool(hf.get("use_conv_bias", True)),
            residual_in_fp32=bool(hf.get("residual_in_fp32", True)),
        )

    @classmethod
    def hf_config_from_gguf(cls, arch: str, key: Callable[[str, Any], Any]) -> dict[str, Any]:
        raise ConfigError(
            "GGUF Mamba files are not supported (llama.cpp stores A as -exp(A_log) under its own names); "
            "load the HF MambaForCausalLM checkpoint instead"
        )

    # ---------------------------------------------------------------- the math

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: RecurrentMetadata | DenseCausal
    ) -> torch.Tensor:
        """Hidden states [T, hidden]; positions are unused (the order of the scan is the position)."""
        return self.backbone(input_ids, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def cache_specs(self) -> list[RecurrentStateSpec]:
        """One fixed-size recurrent state per layer and sequence: nothing grows with the length."""
        return [layer.mixer.state_spec() for layer in self.backbone.layers]

    # ---------------------------------------------------------------- what compression sees

    def decoder_layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def smoothing_pairs(self, layer: MambaBlock) -> list[SmoothingPair]:
        """norm -> in_proj. out_proj's input is not linear in any earlier output (the scan's step
        and the gate are nonlinear in it), so it has no pair."""
        mixer = layer.mixer
        return [SmoothingPair("in", layer.norm, (mixer.in_proj,), mixer, block_takes_layer_args=True)]
