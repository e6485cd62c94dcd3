"""Load an HF model directory: config.json plus single or sharded ``*.safetensors``.

A ``quantization_config`` in config.json (GPTQ, AWQ, compressed-tensors) is read by
``loading/quantized.py``, which hands quantized Linears their ``QuantizedWeight``.

Tensors are memory-mapped and copied one at a time into parameters already allocated in the
target dtype, so peak memory is the model once, not the checkpoint plus the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from effinfer.config import ConfigError, ModelConfig
from effinfer.loading.builder import WeightsError, build_model, fill_model, finalize_model
from effinfer.loading.quantized import quantized_tensors, read_quantization_config

__all__ = ["WeightsError", "check_model_dir", "find_weight_files", "load_model"]


def find_weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(others)}; only safetensors is supported)" if others else ""
        raise WeightsError(f"no *.safetensors weights in model directory {str(path)!r}{hint}")
    return files


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"model path {str(path)!r} is not a directory with config.json and *.safetensors")
    return path


def _read_tensors(files: list[Path]):
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor, tensor.numel() * tensor.element_size()


def load_model(
    path: str | os.PathLike,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    show_progress: bool = True,
    finalize: bool = True,
) -> torch.nn.Module:
    """The model with its weights; ``finalize=False`` leaves plain float weights for compression to work on."""
    path = check_model_dir(path)
    files = find_weight_files(path)
    quant = read_quantization_config(path)  # checked before anything is allocated
    model = build_model(config, dtype, device, max_positions)
    total = sum(os.path.getsize(f) for f in files)
    tensors = _read_tensors(files)
    if quant is not None:  # GPTQ / AWQ / compressed-tensors: Linears get QuantizedWeights
        tensors = quantized_tensors(model, quant, files, tensors, device, repr(str(path)))
    fill_model(model, config, tensors, total, repr(str(path)), show_progress=show_progress)
    return finalize_model(model, device, dtype, prepare_kernels=finalize)
