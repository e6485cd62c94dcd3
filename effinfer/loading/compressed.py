"""effinfer's own checkpoint layout: any registered compressed weight stored as its ``state_dict``.

No paper: the layouts of GPTQ, AWQ, compressed-tensors and bitsandbytes store integer codes and
codebooks only; a weight type they cannot express (low-rank U·V factors) is written here instead.
Idea: config.json's ``quantization_config`` is ``{"quant_method": "effinfer", "layers": {HF name:
{"kind", "metadata", "tensors"}}}`` and the safetensors file holds ``<HF name>.<key>`` for each of a
layer's ``state_dict`` tensors; loading rebuilds the weight with the type the registry names for
``kind`` (``quant/registry.weight_type``). Switch on: ``save_quantized(..., format="effinfer")``
writes it (``effinfer compress --low-rank`` does); ``LLM(path)`` reads it.
"""

from __future__ import annotations

import torch

from effinfer.config import ConfigError
from effinfer.loading import quant_formats as qf
from effinfer.loading.quant_formats import CheckpointFormat
from effinfer.quant import registry
from effinfer.quant.base import CompressedWeight

METHOD = "effinfer"


class EffinferFormat(CheckpointFormat):
    """Reads the layers that ``quantization_config["layers"]`` lists, by their ``kind``."""

    def __init__(self, quant: dict) -> None:
        layers = quant.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise ConfigError('effinfer quantization_config has no "layers" object')
        for name, entry in layers.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), list):
                raise ConfigError(f"effinfer quantization_config: layer {name!r} lacks its tensor list")
            try:
                registry.weight_type(str(entry.get("kind")))
            except ValueError as e:
                raise ConfigError(f"effinfer quantization_config: layer {name!r}: {e}") from None
        self.layers = layers

    def quantized_layers(self, names: set[str]) -> dict[str, set[str]]:
        for layer, entry in self.layers.items():
            missing = [k for k in entry["tensors"] if f"{layer}.{k}" not in names]
            if missing:
                raise ConfigError(f"checkpoint lacks {layer}.{missing[0]} that quantization_config lists")
        return {layer: set(entry["tensors"]) for layer, entry in self.layers.items()}

    def decode(self, layer: str, tensors: dict[str, torch.Tensor]) -> qf.QuantizedShard:
        entry = self.layers[layer]
        weight = registry.weight_type(entry["kind"]).from_state_dict(tensors, entry.get("metadata") or {})
        return qf.QuantizedShard(weight, entry.get("act_quant"))


def writer_config(quantized: list[tuple[str, CompressedWeight, str | None]]):
    """(quantization_config, pack) for ``compress/quant/formats.save_quantized``: every weight as its state_dict."""
    layers = {}
    for name, weight, act_quant in quantized:
        tensors, metadata = weight.state_dict()
        layers[name] = {"kind": weight.kind, "metadata": metadata, "tensors": sorted(tensors)}
        if act_quant is not None:
            layers[name]["act_quant"] = act_quant
    return {"quant_method": METHOD, "layers": layers}, lambda name, weight, act: weight.state_dict()[0]
