"""The model families effinfer runs: adding an architecture is its module plus one line in ``FAMILIES``.

Lookups go by HF ``architectures`` name (config.json) or GGUF ``general.architecture``; each
family's config parser is also registered with ``config.ModelConfig.from_hf``, which sits below
the models in the import layers and so cannot import them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from effinfer.config import ConfigError, register_hf_config_parser
from effinfer.models.base import CausalLM
from effinfer.models.gemma3 import Gemma3ForCausalLM
from effinfer.models.llama import LlamaForCausalLM
from effinfer.models.mamba import MambaForCausalLM
from effinfer.models.moe import MoeForCausalLM

FAMILIES: list[type[CausalLM]] = [
    LlamaForCausalLM,
    Gemma3ForCausalLM,
    MambaForCausalLM,
    MoeForCausalLM,
]

for _family in FAMILIES:
    for _name in _family.hf_architectures:
        register_hf_config_parser(_name, _family.config_from_hf)


def hf_architectures() -> list[str]:
    """Every HF ``architectures`` name effinfer runs."""
    return [name for family in FAMILIES for name in family.hf_architectures]


def gguf_architectures() -> list[str]:
    """Every GGUF ``general.architecture`` effinfer loads."""
    return [name for family in FAMILIES for name in family.gguf_architectures]


def _family(name: str, names_of: Callable[[type[CausalLM]], tuple[str, ...]], unsupported: str):
    family = next((f for f in FAMILIES if name in names_of(f)), None)
    if family is None:
        supported = [n for f in FAMILIES for n in names_of(f)]
        raise ConfigError(f"{unsupported}; supported: {', '.join(supported)}")
    return family


def model_class(architecture: str) -> type[CausalLM]:
    """The family that runs an HF ``architectures`` name."""
    return _family(architecture, lambda f: f.hf_architectures, f"unsupported architecture {architecture!r}")


def family_for_gguf(arch: str, metadata: Mapping[str, Any] | None = None) -> type[CausalLM]:
    """The family that loads a GGUF ``general.architecture``; with the file's ``metadata``, a file
    with experts goes to the family that claims the architecture's expert files (Mixtral's ``llama``)."""
    if metadata and metadata.get(f"{arch}.expert_count"):
        for family in FAMILIES:
            if arch in family.gguf_expert_architectures:
                return family
    return _family(arch, lambda f: f.gguf_architectures, f"GGUF architecture {arch!r} is not supported")


def gguf_architecture_for(hf_architecture: str) -> str | None:
    """The GGUF architecture an HF checkpoint is converted to, or None if it cannot be."""
    return model_class(hf_architecture).gguf_architecture_for(hf_architecture)
