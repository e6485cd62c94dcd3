"""Write a quantized effinfer model as an HF checkpoint in GPTQ, AWQ (GEMM) or compressed-tensors format.

Papers: GPTQ (Frantar et al. 2022), AWQ (Lin et al. 2023), SmoothQuant W8A8 (Xiao et al. 2022)
stored the way AutoGPTQ / GPTQModel, AutoAWQ and llm-compressor store them, so vLLM,
transformers and effinfer itself can load the result. Idea: split each fused Linear back into
its checkpoint tensors (q/k/v, gate/up), pack every ``QuantizedWeight`` with
``loading/quant_formats.py`` and describe the scheme in config.json's ``quantization_config``.
Switch on: ``save_quantized(model, src_dir, src_dir, out_dir, format="gptq")`` after quantizing
(``effinfer quantize ... --format gptq|awq|compressed-tensors``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from effinfer.layers.linear import Linear
from effinfer.loading import bnb, compressed
from effinfer.loading import quant_formats as qf
from effinfer.quant.integer import QuantizedWeight

FORMATS = ("gptq", "awq", "compressed-tensors", "bitsandbytes", "effinfer")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# GPTQ settings that only describe how the quantizer ran; copied from ``method_info`` when given.
_GPTQ_INFO_KEYS = ("damp_percent", "true_sequential", "static_groups", "model_name_or_path")


def save_quantized(
    model: torch.nn.Module,
    model_config: str | os.PathLike | dict,
    tokenizer_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    format: str = "gptq",
    method_info: dict | None = None,
) -> Path:
    """Write ``model`` (its quantized Linears and every other weight) as an HF checkpoint in ``out_dir``.

    ``model_config`` is the source config.json's directory or its contents; ``tokenizer_dir`` is
    where tokenizer files (and generation_config.json) are copied from. ``method_info`` (how the
    weights were quantized, e.g. ``{"method": "gptq", "damp_percent": 0.01}``) is recorded in
    ``quantization_config["effinfer"]``. Raises ValueError when the format cannot express the
    model's scheme (AWQ with 8 bits or act-order, GPTQ/AWQ with W8A8, mixed bit widths, ...).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}")
    method_info = dict(method_info or {})
    hf_config, source_dir = _read_config(model_config)
    layers = _checkpoint_layers(model)  # [(HF name, QuantizedWeight | None, act_quant, float weight, bias)]
    quantized = [(name, qw, act) for name, qw, act, _, _ in layers if qw is not None]
    if not quantized:
        raise ValueError("the model has no quantized Linear layers to save")

    other = sorted({type(qw).__name__ for _, qw, _ in quantized if not isinstance(qw, QuantizedWeight)})
    if format not in ("bitsandbytes", "effinfer") and other:
        raise ValueError(f"the {format} layout stores integer codes; this model holds {', '.join(other)}")
    if format == "gptq":
        quant_config, pack = _gptq_config(quantized, method_info)
    elif format == "awq":
        quant_config, pack = _awq_config(quantized)
    elif format == "bitsandbytes":  # NF4 / FP4 and LLM.int8(), transformers' layout
        quant_config, pack = bnb.writer_config(quantized)
    elif format == "effinfer":  # any weight type, as its state_dict (loading/compressed.py)
        quant_config, pack = compressed.writer_config(quantized)
    else:
        quant_config, pack = _compressed_tensors_config(quantized, [n for n, qw, *_ in layers if qw is None])
    if method_info:
        quant_config["effinfer"] = method_info

    tensors: dict[str, torch.Tensor] = {}
    linear_params = set()
    for name, qw, act, weight, bias in layers:
        if qw is not None:
            for key, value in pack(name, qw, act).items():
                tensors[f"{name}.{key}"] = value
        elif weight is not None:
            tensors[f"{name}.weight"] = weight
        if bias is not None:
            tensors[f"{name}.bias"] = bias
    for module_name, module in model.named_modules():
        if isinstance(module, Linear):
            linear_params.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    for name, param in model.named_parameters():
        if name not in linear_params:
            tensors[name] = param.detach()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if format == "gptq":  # AutoGPTQ reads its settings from this file as well
        (out / "quantize_config.json").write_text(json.dumps(quant_config, indent=2, sort_keys=True) + "\n")
    _copy_side_files(out, tokenizer_dir, source_dir)
    return out


# ---- the model's Linears under their checkpoint names ------------------------------------------


def _read_config(model_config: str | os.PathLike | dict) -> tuple[dict, Path | None]:
    if isinstance(model_config, dict):
        config, source = json.loads(json.dumps(model_config)), None
    else:
        source = Path(model_config)
        config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    return config, source


def _checkpoint_layers(model: torch.nn.Module) -> list[tuple]:
    """Every Linear split into its checkpoint tensors: (HF name, QuantizedWeight or None, act_quant,
    float weight or None, bias or None). A tied lm_head is left out (the embedding is saved)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    packed = getattr(model, "packed_modules", {})
    layers = []
    for module_name, module in model.named_modules():
        if not isinstance(module, Linear) or (tied and module_name == "lm_head"):
            continue
        parent, _, leaf = module_name.rpartition(".")
        parts = sorted((shard, ckpt) for ckpt, (ours, shard) in packed.items() if ours == leaf)
        names = [f"{parent}.{ckpt}" if parent else ckpt for _, ckpt in parts] or [module_name]
        if len(names) != len(module.shard_sizes):
            raise ValueError(f"{module_name} fuses {len(module.shard_sizes)} tensors but maps to {names}")
        if module.quantized is None and module.weight.numel() == 0:
            raise ValueError(
                f"{module_name} has no float weight left (released by finalize); load with finalize=False"
            )
        start = 0
        for shard, (name, rows) in enumerate(zip(names, module.shard_sizes)):
            qw = module.quantized.rows(start, start + rows) if module.quantized is not None else None
            weight = module.shard("weight", shard) if module.quantized is None else None
            bias = module.shard("bias", shard) if module.bias is not None else None
            layers.append((name, qw, module.act_quant if qw is not None else None, weight, bias))
            start += rows
    return layers


def _uniform(quantized: list, what: str, fmt: str, value) -> int:
    values = {value(qw) for _, qw, _ in quantized}
    if len(values) > 1:
        raise ValueError(f"{fmt} stores one {what} for the whole model; the layers use {sorted(values)}")
    return values.pop()


def _no_act_quant(quantized: list, fmt: str) -> None:
    w8a8 = [name for name, _, act in quantized if act is not None]
    if w8a8:
        raise ValueError(
            f"{fmt} stores weight-only quantization; {w8a8[0]} also quantizes activations "
            "(save W8A8 models as compressed-tensors)"
        )


def _config_group_size(quantized: list, fmt: str) -> int:
    """One group size for the model: -1 when every layer has one group per output row."""
    if all(qw.num_groups == 1 and qw.g_idx is None for _, qw, _ in quantized):
        return -1
    return _uniform(quantized, "group_size", fmt, lambda qw: qw.group_size)


# ---- per format --------------------------------------------------------------------------------


def _gptq_config(quantized: list, method_info: dict):
    _no_act_quant(quantized, "GPTQ")
    bits = _uniform(quantized, "bit width", "GPTQ", lambda qw: qw.bits)
    if bits not in qf.GPTQ_BITS:
        raise ValueError(f"GPTQ cannot store {bits}-bit weights (supported: 2, 3, 4, 8)")
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": _config_group_size(quantized, "GPTQ"),
        "desc_act": any(qw.has_act_order() for _, qw, _ in quantized),
        "sym": all(qw.symmetric for _, qw, _ in quantized),
        "checkpoint_format": "gptq",
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
    }
    config.update({k: method_info[k] for k in _GPTQ_INFO_KEYS if k in method_info})
    return config, lambda name, qw, act: qf.pack_gptq(qw, "gptq")


def _awq_config(quantized: list):
    _no_act_quant(quantized, "AWQ")
    bits = _uniform(quantized, "bit width", "AWQ", lambda qw: qw.bits)
    if bits != 4:
        raise ValueError(f"AWQ GEMM stores 4-bit weights only, the model has {bits}-bit ones")
    if any(qw.has_act_order() for _, qw, _ in quantized):
        raise ValueError("AWQ GEMM cannot store act-order (g_idx) groups; use GPTQ or compressed-tensors")
    config = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": _config_group_size(quantized, "AWQ"),
        # Symmetric weights are stored exactly as zero points of 8, which every AWQ GEMM kernel reads.
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    return config, lambda name, qw, act: qf.pack_awq(qw)


def _compressed_tensors_config(quantized: list, float_layers: list[str]):
    groups: dict[str, dict] = {}  # scheme json -> config group
    layer_format: dict[str, str] = {}
    for name, qw, act in quantized:
        fmt = "int-quantized" if act is not None else "pack-quantized"
        if fmt == "pack-quantized" and qw.bits not in qf.CT_PACKED_BITS:
            raise ValueError(
                f"compressed-tensors pack-quantized cannot store {qw.bits}-bit weights (2, 4, 8)"
            )
        if fmt == "int-quantized" and qw.bits != 8:
            raise ValueError(f"{name}: W8A8 needs 8-bit weights, found {qw.bits}-bit ones")
        scheme = {
            "weights": qf.compressed_tensors_args(qw),
            "input_activations": qf.compressed_tensors_input_args(act) if act else None,
            "output_activations": None,
            "format": fmt,
        }
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(name)
        layer_format[name] = fmt
    formats = sorted(set(layer_format.values()))
    config_groups = {}
    for i, group in enumerate(groups.values()):
        if len(groups) == 1:
            group["targets"] = ["Linear"]  # every Linear not in ``ignore``
        if len(formats) == 1:
            del group["format"]  # older compressed-tensors releases only know the top-level format
        config_groups[f"group_{i}"] = group
    config = {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(set(float_layers) | {"lm_head"}),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
    return config, lambda name, qw, act: qf.pack_compressed_tensors(qw, layer_format[name])


def _copy_side_files(out: Path, tokenizer_dir, source_dir: Path | None) -> None:
    sources = [Path(d) for d in (tokenizer_dir, source_dir) if d is not None]
    for directory in sources[:1]:
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, out / name)
    for directory in reversed(sources):  # generation settings belong to the model, so its dir wins
        if (directory / "generation_config.json").is_file():
            shutil.copyfile(directory / "generation_config.json", out / "generation_config.json")
            break
