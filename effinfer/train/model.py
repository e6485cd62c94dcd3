"""The model and optimizer a training run starts from.

A fresh model is effinfer's own ``LlamaForCausalLM`` in float32, initialised as GPT-2 does
(Radford et al. 2019): every weight matrix N(0, 0.02), norms 1, and the projections that write
into the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * layers) so the residual's
variance does not grow with depth. ``--init`` loads an HF directory instead (fine-tuning).

The optimizer is AdamW (Loshchilov & Hutter 2019, decoupled weight decay), decaying weight
matrices only, never norms or biases. The learning rate warms up linearly, then follows a
cosine (Loshchilov & Hutter 2017, SGDR without restarts) down to ``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch
from torch import nn

from effinfer.config import ModelConfig
from effinfer.loading.safetensors import load_model
from effinfer.models.base import CausalLM
from effinfer.models.registry import model_class

INIT_STD = 0.02


def scratch_hf_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_positions: int,
    tie_embeddings: bool,
    separator_id: int,
    rope_theta: float = 10000.0,
) -> dict:
    """An HF Llama config.json for a model trained from scratch."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} heads cannot be shared among {num_kv_heads} KV heads")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        # transformers 5 reads rope_parameters, 4.x rope_theta; both say the same.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": separator_id,
        "eos_token_id": separator_id,
        "use_cache": True,
        "dtype": "float32",
    }


def build_model(hf_config: dict, max_positions: int, device: torch.device, seed: int) -> CausalLM:
    """A freshly initialised float32 model (the same on every process for the same seed)."""
    config = ModelConfig.from_hf(hf_config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config.architecture)(config, max_positions)
    residual_std = INIT_STD / math.sqrt(2 * config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # RMSNorm weights (biases, if any, start at zero)
                param.fill_(0.0 if name.endswith(".bias") else 1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, residual_std)
            else:
                param.normal_(0.0, INIT_STD)
    model.prepare(device, torch.float32)
    return model


def load_init_model(path: Path, max_positions: int, device: torch.device) -> tuple[CausalLM, dict]:
    """(model, its config.json) from an HF directory effinfer can load, in float32 for training."""
    hf_config = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_hf(hf_config)
    positions = max(max_positions, config.max_position_embeddings)
    # Plain float weights: the kernels' inference copy of a finalized Linear is outside autograd.
    model = load_model(path, config, torch.float32, device, positions, show_progress=False, finalize=False)
    return model, hf_config


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class NextTokenLoss(nn.Module):
    """Mean cross-entropy of each position's logits against the next token.

    A module of its own so that ``DistributedDataParallel``, which hooks ``forward``, can wrap it.
    """

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.compute_logits(self.model.forward_dense(inputs))
        # Softmax over the vocabulary in float32 even under bf16 autocast.
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
