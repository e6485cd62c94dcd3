"""Read quantized HF checkpoints (GPTQ, AWQ GEMM, compressed-tensors) into effinfer's quantized Linears.

Papers: GPTQ (Frantar et al. 2022), AWQ (Lin et al. 2023); compressed-tensors is llm-compressor's
format (also SmoothQuant W8A8, Xiao et al. 2022). Idea: config.json's ``quantization_config``
names the method; the tensors of each quantized Linear (``qweight``/``qzeros``/``scales``/...)
are gathered as they stream past and turned into one ``QuantizedWeight``, which the Linear keeps
instead of a float weight. Switch on: nothing to do; ``load_model`` / ``LLM(path)`` detect it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from effinfer.config import ConfigError
from effinfer.layers.linear import Linear
from effinfer.loading import quant_formats as qf
from effinfer.loading.bnb import BitsAndBytesFormat
from effinfer.loading.builder import WeightsError
from effinfer.loading.compressed import EffinferFormat
from effinfer.loading.quant_formats import CheckpointFormat

SUPPORTED_METHODS = ("gptq", "awq", "compressed-tensors", "bitsandbytes", "effinfer")
_CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


def read_quantization_config(path: Path) -> dict | None:
    """``quantization_config`` of config.json in ``path`` (None for a float checkpoint), checked."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        quant = json.loads(config_path.read_text()).get("quantization_config")
    except json.JSONDecodeError:
        return None  # ModelConfig.from_dir reports a broken config.json with a better message
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"{config_path}: quantization_config must be an object")
    checkpoint_format(quant)  # an unsupported method fails here, before the model is built
    return quant


class _GPTQ(CheckpointFormat):
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    marker = "qweight"

    def __init__(self, quant: dict) -> None:
        self.bits = int(quant.get("bits", 4))
        self.group_size = int(quant.get("group_size", 128))
        self.checkpoint_format = str(quant.get("checkpoint_format", "gptq")).lower()
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise ConfigError(
                f"GPTQ checkpoint_format {self.checkpoint_format!r} is not supported (supported: gptq, gptq_v2)"
            )
        if self.bits not in qf.GPTQ_BITS:
            raise ConfigError(f"GPTQ with {self.bits} bits is not supported (supported: 2, 3, 4, 8)")

    def decode(self, layer: str, tensors: dict[str, torch.Tensor]) -> qf.QuantizedShard:
        return qf.QuantizedShard(qf.unpack_gptq(tensors, self.bits, self.group_size, self.checkpoint_format))


class _AWQ(CheckpointFormat):
    suffixes = ("qweight", "qzeros", "scales")
    marker = "qweight"

    def __init__(self, quant: dict) -> None:
        self.bits = int(quant.get("bits", quant.get("w_bit", 4)))
        self.group_size = int(quant.get("group_size", quant.get("q_group_size", 128)))
        version = str(quant.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"AWQ version {version!r} is not supported (supported: gemm)")
        if self.bits != 4:
            raise ConfigError(f"AWQ GEMM with {self.bits} bits is not supported (only 4)")

    def decode(self, layer: str, tensors: dict[str, torch.Tensor]) -> qf.QuantizedShard:
        return qf.QuantizedShard(qf.unpack_awq(tensors, self.bits, self.group_size))


class _CompressedTensors(CheckpointFormat):
    suffixes = (
        "weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
    )  # fmt: skip
    marker = "weight_scale"

    def __init__(self, quant: dict) -> None:
        groups = quant.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise ConfigError("compressed-tensors quantization_config has no config_groups")
        self.default_format = quant.get("format", "dense")
        self.groups = []
        for name, scheme in groups.items():
            if not isinstance(scheme, dict):
                raise ConfigError(f"compressed-tensors preset scheme {name!r} is not supported; spell it out")
            fmt = scheme.get("format") or self.default_format
            if fmt not in _CT_FORMATS:
                raise ConfigError(
                    f"compressed-tensors format {fmt!r} is not supported (supported: {', '.join(_CT_FORMATS)})"
                )
            if scheme.get("weights") is None:
                raise ConfigError(f"compressed-tensors group {name!r} does not quantize weights")
            if scheme.get("output_activations"):
                raise ConfigError(f"compressed-tensors group {name!r} quantizes outputs; not supported")
            try:
                act = qf.compressed_tensors_act_quant(scheme.get("input_activations"))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.groups.append((list(scheme.get("targets") or []), scheme["weights"], act))
        status = quant.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise ConfigError(f"compressed-tensors checkpoint is {status!r}, not 'compressed'")
        if quant.get("kv_cache_scheme"):
            raise ConfigError("compressed-tensors kv_cache_scheme is not supported")

    def check(self, names: set[str]) -> None:
        static = sorted(n for n in names if n.endswith(".input_scale"))
        if static:
            raise WeightsError(f"static activation scales ({static[0]}, ...) are not supported")

    def scheme_for(self, layer: str) -> tuple[dict, str | None]:
        # Explicit names and regexes win over a class target such as "Linear", as in compressed-tensors.
        ranked = []
        for targets, weights, act in self.groups:
            for target in targets:
                if target.startswith("re:"):
                    if re.match(target[3:], layer):
                        ranked.append((1, weights, act))
                elif target == layer or layer.endswith("." + target):
                    ranked.append((0, weights, act))
                elif target in ("Linear", "torch.nn.Linear", "nn.Linear"):
                    ranked.append((2, weights, act))
        if not ranked:
            raise ValueError("no compressed-tensors config group targets this layer")
        _, weights, act = min(ranked, key=lambda r: r[0])
        return weights, act

    def decode(self, layer: str, tensors: dict[str, torch.Tensor]) -> qf.QuantizedShard:
        weights, act = self.scheme_for(layer)
        return qf.QuantizedShard(qf.unpack_compressed_tensors(tensors, weights), act)


def checkpoint_format(quant: dict) -> CheckpointFormat:
    """The reader for a ``quantization_config``; a clear error for methods effinfer cannot read."""
    method = str(quant.get("quant_method", "")).lower()
    if method == "gptq":
        return _GPTQ(quant)
    if method == "awq":
        return _AWQ(quant)
    if method == "compressed-tensors":
        return _CompressedTensors(quant)
    if method == "bitsandbytes":
        return BitsAndBytesFormat(quant)
    if method == "effinfer":  # any registered weight type by its state_dict (loading/compressed.py)
        return EffinferFormat(quant)
    raise ConfigError(
        f"quantization method {method or '(none given)'!r} is not supported; "
        f"effinfer reads {', '.join(SUPPORTED_METHODS)} checkpoints"
    )


def _tensor_names(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.update(f.keys())
    return names


def quantized_tensors(
    model: nn.Module,
    quant: dict,
    files: list[Path],
    tensors: Iterable[tuple[str, torch.Tensor, int]],
    device: torch.device,
    source: str,
) -> Iterator[tuple[str, torch.Tensor | qf.QuantizedShard, int]]:
    """Turn the stream of checkpoint tensors into one that ``fill_model`` can route.

    The tensors of a quantized Linear are held back until all of them have arrived, then passed
    on as one ``QuantizedShard`` under the name of the float weight they replace; every other
    tensor passes through. The float weights of quantized Linears are released up front.
    """
    fmt = checkpoint_format(quant)
    names = _tensor_names(files)
    fmt.check(names)
    layers = fmt.quantized_layers(names)
    _release_float_weights(model, set(layers), names, source)
    return _stream(fmt, layers, tensors, device, source, model)


def _release_float_weights(model: nn.Module, layers: set[str], names: set[str], source: str) -> None:
    """Give quantized Linears an empty weight now (their codes arrive later); refuse mixed fused layers."""
    modules = dict(model.named_modules())
    shards: dict[str, dict[int, bool]] = {}
    float_layers = {n[: -len(".weight")] for n in names if n.endswith(".weight")} - layers
    for layer, quantized in [(x, True) for x in layers] + [(x, False) for x in float_layers]:
        target = model.checkpoint_target(f"{layer}.weight")
        if target is None:
            continue
        module_name = target[0].rpartition(".")[0]
        if isinstance(modules.get(module_name), Linear):
            shards.setdefault(module_name, {})[target[1]] = quantized
    for module_name, kinds in shards.items():
        if len(set(kinds.values())) > 1:
            raise WeightsError(
                f"checkpoint {source}: {module_name} mixes quantized and float checkpoint tensors"
            )
        if all(kinds.values()):
            linear = modules[module_name]
            linear.weight = nn.Parameter(
                torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device), requires_grad=False
            )


def _stream(fmt, layers, tensors, device, source, model):
    pending: dict[str, dict[str, torch.Tensor]] = {}
    pending_bytes: dict[str, int] = {}
    for name, tensor, nbytes in tensors:
        found = fmt.split(name, layers)
        if found is None:
            yield name, tensor, nbytes
            continue
        layer, key = found
        pending.setdefault(layer, {})[key] = tensor
        pending_bytes[layer] = pending_bytes.get(layer, 0) + nbytes
        if len(pending[layer]) < len(layers[layer]):
            continue
        try:
            shard = fmt.decode(layer, pending.pop(layer))
        except (ValueError, KeyError) as e:
            raise WeightsError(f"checkpoint {source}: quantized layer {layer!r}: {e}") from None
        shard.weight = shard.weight.to(device)
        yield f"{layer}.weight", shard, pending_bytes.pop(layer)
    unfused = [n for n, m in model.named_modules() if isinstance(m, Linear) and m._quantized_shards]
    if unfused:
        raise WeightsError(f"checkpoint {source}: quantized layer {unfused[0]} lacks some of its fused parts")
