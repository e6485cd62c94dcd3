"""HF ``architectures`` name -> effinfer model class."""

from __future__ import annotations

from effinfer.config import HF_CONFIG_PARSERS, SUPPORTED_ARCHITECTURES, ConfigError
from effinfer.models.gemma3 import Gemma3ForCausalLM
from effinfer.models.llama import LlamaForCausalLM

MODEL_CLASSES = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}
# Families that parse their own config.json and GGUF metadata (the model interface).
FAMILIES = (Gemma3ForCausalLM,)
for family in FAMILIES:
    for name in family.hf_architectures:
        MODEL_CLASSES[name] = family
        HF_CONFIG_PARSERS[name] = family.config_from_hf
GGUF_FAMILIES = {arch: family for family in FAMILIES for arch in family.gguf_architectures}


def model_class(architecture: str):
    if architecture not in MODEL_CLASSES:
        raise ConfigError(
            f"unsupported architecture {architecture!r}; effinfer supports {', '.join(MODEL_CLASSES)}"
        )
    return MODEL_CLASSES[architecture]
