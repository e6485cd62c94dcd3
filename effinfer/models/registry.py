"""HF ``architectures`` name -> effinfer model class."""

from __future__ import annotations

from effinfer.config import SUPPORTED_ARCHITECTURES, ConfigError
from effinfer.models.llama import LlamaForCausalLM

MODEL_CLASSES = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}


def model_class(architecture: str):
    if architecture not in MODEL_CLASSES:
        raise ConfigError(
            f"unsupported architecture {architecture!r}; effinfer supports {', '.join(MODEL_CLASSES)}"
        )
    return MODEL_CLASSES[architecture]
