"""Read and write checkpoints in the layout transformers' bitsandbytes integration saves (4-bit and 8-bit).

Papers: QLoRA (Dettmers et al. 2023) for NF4 / FP4 with double quantization, LLM.int8()
(Dettmers et al. 2022) for 8-bit. Idea: ``quantization_config.quant_method == "bitsandbytes"``;
a 4-bit Linear stores ``weight`` (uint8, two codes per byte over the flattened tensor, first
code in the high nibble), ``weight.absmax``, ``weight.quant_map`` and, with double quantization,
``weight.nested_absmax`` / ``weight.nested_quant_map``, plus ``weight.quant_state.bitsandbytes__<type>``:
a JSON object (blocksize, shape, nested offset, ...) stored as a uint8 tensor. An 8-bit Linear
stores ``weight`` (int8), ``SCB`` (each row's absmax) and ``weight_format``. They become
``CodebookWeight`` / ``LLMInt8Weight``. Switch on: nothing to do for loading (``LLM(path)``);
``save_quantized(..., format="bitsandbytes")`` writes the 4-bit layout.
"""

from __future__ import annotations

import json

import torch

from effinfer.config import ConfigError
from effinfer.loading import quant_formats as qf
from effinfer.loading.quant_formats import CheckpointFormat
from effinfer.quant.codebook import QUANT_TYPES, CodebookWeight, NestedAbsmax
from effinfer.quant.llm_int8 import LLMInt8Weight

_STATE_PREFIX = "weight.quant_state.bitsandbytes__"


# ---- decoding one Linear -----------------------------------------------------------------------


def _unpack_state(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))


def decode_4bit(tensors: dict[str, torch.Tensor]) -> CodebookWeight:
    """One Linear's 4-bit tensors (keys relative to the layer: ``weight``, ``weight.absmax``, ...)."""
    states = [k for k in tensors if k.startswith(_STATE_PREFIX)]
    if len(states) != 1:
        raise ValueError(f"expected one {_STATE_PREFIX}<type> tensor, found {len(states)}")
    state = _unpack_state(tensors[states[0]])
    quant_type = state.get("quant_type", states[0][len(_STATE_PREFIX) :])
    out_features, in_features = (int(v) for v in state["shape"])
    n = out_features * in_features
    packed = tensors["weight"].reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bnb_4bit_quant_storage may be another dtype
    if packed.numel() != -(-n // 2):
        raise ValueError(
            f"packed weight has {packed.numel()} bytes, a {out_features}x{in_features} one needs {-(-n // 2)}"
        )
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].view(out_features, in_features)
    blocksize = int(state["blocksize"])
    absmax = tensors["weight.absmax"]
    nested: tuple[NestedAbsmax, ...] = ()
    if "weight.nested_absmax" in tensors:
        inner = NestedAbsmax(
            absmax.to(torch.uint8),
            tensors["weight.nested_absmax"].float(),
            torch.tensor(float(state["nested_offset"]), dtype=torch.float32),
            tensors["weight.nested_quant_map"].float(),
            int(state["nested_blocksize"]),
        )
        nested, absmax = (inner,), inner.dequantize()
    return CodebookWeight(
        codes.contiguous(), absmax.float(), tensors["weight.quant_map"].float(), quant_type, blocksize, nested
    )


def decode_8bit(tensors: dict[str, torch.Tensor], threshold: float):
    """One Linear's 8-bit tensors: int8 ``weight`` and ``SCB`` (row absmax); W = weight * SCB / 127."""
    return LLMInt8Weight(tensors["weight"].to(torch.int8), tensors["SCB"].float(), threshold)


# ---- reading a checkpoint ----------------------------------------------------------------------


class BitsAndBytesFormat(CheckpointFormat):
    """bitsandbytes' tensors for ``loading/quantized.py``: keys are ``weight``, ``weight.<state>`` and ``SCB``."""

    def __init__(self, quant: dict) -> None:
        four, eight = bool(quant.get("load_in_4bit")), bool(quant.get("load_in_8bit"))
        if four == eight:
            raise ConfigError(
                "bitsandbytes quantization_config must set exactly one of load_in_4bit / load_in_8bit"
            )
        if four and str(quant.get("bnb_4bit_quant_type", "fp4")) not in QUANT_TYPES:
            raise ConfigError(
                f"bitsandbytes 4-bit type {quant.get('bnb_4bit_quant_type')!r} is not supported"
            )
        if eight and quant.get("llm_int8_has_fp16_weight"):
            raise ConfigError(
                "bitsandbytes 8-bit checkpoints with llm_int8_has_fp16_weight are not supported"
            )
        self.four = four
        self.threshold = float(quant.get("llm_int8_threshold", 6.0))

    def quantized_layers(self, names: set[str]) -> dict[str, set[str]]:
        marker = ".weight.absmax" if self.four else ".SCB"
        layers = {n[: -len(marker)] for n in names if n.endswith(marker)}
        return {
            layer: {
                n[len(layer) + 1 :] for n in names if n.startswith(layer + ".weight") or n == f"{layer}.SCB"
            }
            for layer in layers
        }

    def split(self, name: str, layers: dict[str, set[str]]) -> tuple[str, str] | None:
        # A key may contain dots (``weight.quant_state...``): the layer ends where ``.weight`` starts.
        cut = len(name) - len(".SCB") if name.endswith(".SCB") else name.rfind(".weight")
        layer, key = name[:cut], name[cut + 1 :]
        return (layer, key) if cut > 0 and key in layers.get(layer, ()) else None

    def decode(self, layer: str, tensors: dict[str, torch.Tensor]) -> qf.QuantizedShard:
        return qf.QuantizedShard(decode_4bit(tensors) if self.four else decode_8bit(tensors, self.threshold))


# ---- writing -----------------------------------------------------------------------------------


def pack_4bit(weight: CodebookWeight, dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes stores for one 4-bit Linear, keys relative to the layer."""
    codes = weight.codes.reshape(-1)
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    state = {
        "quant_type": weight.quant_type,
        "blocksize": weight.blocksize,
        "dtype": dtype,
        "shape": [weight.out_features, weight.in_features],
    }
    tensors = {"weight": packed, "weight.quant_map": weight.code.float()}
    if weight.nested:
        if len(weight.nested) != 1:
            raise ValueError("a bitsandbytes layer holds one double-quantized absmax state")
        nested = weight.nested[0]
        tensors["weight.absmax"] = nested.codes
        tensors["weight.nested_absmax"] = nested.nested_absmax.float()
        tensors["weight.nested_quant_map"] = nested.code.float()
        state.update(
            nested_blocksize=nested.blocksize, nested_dtype="float32", nested_offset=nested.offset.item()
        )
    else:
        tensors["weight.absmax"] = weight.absmax.float()
    tensors[_STATE_PREFIX + weight.quant_type] = torch.tensor(
        list(json.dumps(state).encode()), dtype=torch.uint8
    )
    return tensors


def writer_config(quantized: list) -> tuple[dict, object]:
    """(quantization_config, pack(name, weight, act) -> tensors) for ``compress/quant/formats.save_quantized``."""
    weights = [qw for _, qw, _ in quantized]
    if weights and all(isinstance(qw, LLMInt8Weight) for qw in weights):
        return _writer_config_8bit(weights)
    if not all(isinstance(qw, CodebookWeight) for qw in weights):
        raise ValueError(
            "the bitsandbytes writer stores NF4 / FP4 or LLM.int8() weights (quantize with nf4, fp4 or llm_int8)"
        )
    kinds = {(qw.quant_type, qw.blocksize, qw.double_quant) for qw in weights}
    if len(kinds) > 1:
        raise ValueError(
            f"bitsandbytes stores one 4-bit type, block size and double-quant flag; found {sorted(kinds)}"
        )
    quant_type, _, double_quant = kinds.pop()
    config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }
    return config, lambda name, qw, act: pack_4bit(qw)


def _writer_config_8bit(weights: list) -> tuple[dict, object]:
    """transformers' 8-bit layout: int8 ``weight``, ``SCB`` (row absmax) and ``weight_format`` (0: row-major)."""
    thresholds = {qw.threshold for qw in weights}
    if len(thresholds) > 1:
        raise ValueError(f"bitsandbytes stores one LLM.int8() threshold; found {sorted(thresholds)}")
    config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": False,
        "load_in_8bit": True,
        "_load_in_4bit": False,
        "_load_in_8bit": True,
        "llm_int8_threshold": thresholds.pop(),
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }

    def pack(name, qw, act):
        return {
            "weight": qw.weight,
            "SCB": qw.absmax.float(),
            "weight_format": torch.tensor(0, dtype=torch.uint8),
        }

    return config, pack
