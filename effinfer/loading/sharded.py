"""Shard-wise loading for tensor parallelism: each rank reads only its slice of each checkpoint tensor.

The model, built under tensor parallelism (``layers/parallel.py``), knows which slice each of its
parameters holds (``tp_split``); ``checkpoint_splits`` turns that into a lookup by checkpoint
tensor name. Safetensors reads the slice through its memory-mapped ``get_slice``; a GGUF tensor is
cut in its stored bytes, whole rows or whole quantization blocks, before anything is decoded,
so a quantized weight stays bit-identical to the single-process one. A cut through a block is an
error naming the tensor and the block size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from effinfer import distributed
from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.parallel import TensorSplit, head_split
from effinfer.loading.gguf_quants import BLOCK_FORMATS, FLOAT_TYPES

SplitLookup = Callable[[str], TensorSplit | None]


def checkpoint_splits(model: torch.nn.Module) -> SplitLookup | None:
    """Checkpoint tensor name -> this rank's slice of it (None: the whole tensor); None in one process."""
    if distributed.tp_size() == 1:
        return None
    if not getattr(model, "supports_tensor_parallel", False):
        raise ConfigError(f"{type(model).__name__} does not support tensor parallelism")
    modules = dict(model.named_modules())

    def split_for(name: str) -> TensorSplit | None:
        target = model.checkpoint_target(name)
        if target is None:
            return None
        ours, shard = target
        module_name, _, param_name = ours.rpartition(".")
        module = modules.get(module_name)
        if module is None or not hasattr(module, "tp_split"):
            return None
        if param_name == "bias" and module.tp_split(param_name, shard).dim == 1:
            return None  # a row-parallel layer's bias is not split
        return module.tp_split(param_name, shard)

    return split_for


def read_safetensors_slice(handle, name: str, split: TensorSplit) -> torch.Tensor:
    """Only the rows or columns of ``split`` from an open ``safe_open`` file."""
    view = handle.get_slice(name)
    if split.dim == 0:
        return view[split.start : split.stop]
    return view[:, split.start : split.stop]


def split_gguf_bytes(
    raw: np.ndarray, qtype: QType, shape: tuple[int, ...], split: TensorSplit, name: str
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The stored bytes and shape of ``split`` of a GGUF tensor of ``shape`` (torch order, rows first)."""
    if qtype in FLOAT_TYPES:
        block_values, block_bytes = 1, FLOAT_TYPES[qtype].itemsize
    else:
        block_values, block_bytes, _ = BLOCK_FORMATS[qtype]
    rows, cols = (shape[0], 1) if len(shape) == 1 else shape
    row_bytes = cols // block_values * block_bytes if len(shape) == 2 else block_bytes
    table = raw.reshape(rows, row_bytes)
    if split.dim == 0:
        part = table[split.start : split.stop]
        new_shape = (split.stop - split.start, *shape[1:])
    else:
        for edge in (split.start, split.stop):
            if edge % block_values:
                raise ConfigError(
                    f"tensor parallelism would cut {name!r} at column {edge}, inside a quantization block "
                    f"of {block_values} values; choose a tensor parallel size that splits it on whole blocks"
                )
        part = table[:, split.start // block_values * block_bytes : split.stop // block_values * block_bytes]
        new_shape = (rows, split.stop - split.start)
    return np.ascontiguousarray(part).reshape(-1), new_shape


def rank_head_config(config: ModelConfig) -> ModelConfig:
    """``config`` with this rank's head counts (what per-head row permutations of a shard need)."""
    if distributed.tp_size() == 1:
        return config
    heads = head_split(config.num_heads, config.num_kv_heads)
    return dataclasses.replace(config, num_heads=heads.num_heads, num_kv_heads=heads.num_kv_heads)
