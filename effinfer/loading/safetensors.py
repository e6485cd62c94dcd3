"""Load an HF model directory: config.json plus single or sharded ``*.safetensors``.

A ``quantization_config`` in config.json (GPTQ, AWQ, compressed-tensors) is read by
``loading/quantized.py``, which hands quantized Linears their ``QuantizedWeight``.

Tensors are memory-mapped and copied one at a time into parameters already allocated in the
target dtype, so peak memory is the model once, not the checkpoint plus the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from effinfer.config import ConfigError, ModelConfig
from effinfer.loading.builder import WeightsError, build_model, fill_model, finalize_model
from effinfer.loading.quantized import quantized_tensors, read_quantization_config
from effinfer.loading.sharded import SplitLookup, checkpoint_splits, read_safetensors_slice
from effinfer.models.stage import PipelineStage, stage_tensor_filter

__all__ = ["WeightsError", "check_model_dir", "find_weight_files", "load_model"]


def find_weight_files(path: Path) -> list[Path]:
    """The checkpoint's ``*.safetensors`` files, each checked to open (so a bad one fails before allocation)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / name for name in _read_weight_map(index).values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index} lists shards that are missing: {', '.join(missing)}")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(others)}; only safetensors is supported)" if others else ""
        raise WeightsError(f"no *.safetensors weights in model directory {str(path)!r}{hint}")
    for file in files:
        _check_readable(file)
    return files


def _read_weight_map(index: Path) -> dict[str, str]:
    """``weight_map`` (tensor name -> shard file name) of a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{index} is not valid JSON: {e}") from None
    except AttributeError:  # the JSON is not an object
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f'{index} has no "weight_map" object naming the shard of each tensor')
    bad = [f for f in weight_map.values() if not isinstance(f, str) or not f or Path(f).name != f]
    if bad:
        raise WeightsError(f"{index}: weight_map names {bad[0]!r}, not a shard file name in the directory")
    return weight_map


def _check_readable(file: Path) -> None:
    """Open the file's header: safetensors checks that it parses and that the data covers every tensor."""
    try:
        with safe_open(str(file), framework="pt", device="cpu"):
            pass
    except (SafetensorError, OSError) as e:
        raise WeightsError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"model path {str(path)!r} is not a directory with config.json and *.safetensors")
    return path


def _read_tensors(
    files: list[Path], split_for: SplitLookup | None = None, wanted: Callable[[str], bool] | None = None
):
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if wanted is not None and not wanted(name):
                    continue
                split = split_for(name) if split_for else None
                try:
                    tensor = f.get_tensor(name) if split is None else read_safetensors_slice(f, name, split)
                except SafetensorError as e:
                    raise WeightsError(f"{file}: tensor {name!r} cannot be read: {e}") from None
                yield name, tensor, tensor.numel() * tensor.element_size()


def load_model(
    path: str | os.PathLike,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    show_progress: bool = True,
    finalize: bool = True,
    stage: PipelineStage | None = None,
) -> torch.nn.Module:
    """The model with its weights; ``finalize=False`` leaves plain float weights for compression to work on;
    ``stage``: only that pipeline stage's modules and weights."""
    path = check_model_dir(path)
    files = find_weight_files(path)
    quant = read_quantization_config(path)  # checked before anything is allocated
    model = build_model(config, dtype, device, max_positions, stage)
    split_for = checkpoint_splits(model)  # under tensor parallelism, this rank's slices only
    if quant is not None and split_for is not None:
        raise ConfigError(f"{quant.method} checkpoints do not support tensor parallelism yet")
    total = sum(os.path.getsize(f) for f in files)
    # A pipeline stage reads its own tensors only (a quantized checkpoint's are grouped per layer first).
    tensors = _read_tensors(files, split_for, stage_tensor_filter(model) if quant is None else None)
    if quant is not None:  # GPTQ / AWQ / compressed-tensors: Linears get QuantizedWeights
        tensors = quantized_tensors(model, quant, files, tensors, device, repr(str(path)))
    fill_model(model, config, tensors, total, repr(str(path)), show_progress=show_progress)
    return finalize_model(model, device, dtype, prepare_kernels=finalize)
