"""Multi-head to grouped-query attention by mean-pooling KV heads.

Paper: Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints" (arXiv 2305.13245), section 2.1.

Idea: split the K (and V) heads into N groups of neighbours; each new head's projection is the
mean of its group's projections (biases too), q and o stay as they are. The KV cache shrinks by
heads/N; a short uptraining (the paper: 5% of pre-training) recovers most of the lost quality.

    effinfer convert --to-gqa 2 MODEL_DIR OUT_DIR
    effinfer train --data CORPUS --init OUT_DIR --out TUNED --max-steps 300   # optional uptraining

Works on checkpoints: reads an HF directory of the Llama family, writes another one (config with
``num_key_value_heads = N``, pooled safetensors, the tokenizer files copied).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from effinfer.config import ConfigError, ModelConfig
from effinfer.loading.safetensors import check_model_dir, find_weight_files

# Architectures whose K/V projections are `model.layers.{i}.self_attn.{k,v}_proj` with head-major rows
# and whose query head h reads KV head h // (heads / kv_heads), as in HF's repeat_kv.
GQA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_KV_PROJECTION = re.compile(r"model\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)$")
# Everything of a model directory that is not config.json or weights, and that a pooled model keeps.
_COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template*",
    "vocab.*",
    "merges.txt",
    "*.model",
)


class GqaError(ConfigError):
    """The model cannot be converted to grouped-query attention as asked; the message says why."""


@dataclass(frozen=True)
class GqaConversion:
    out_dir: Path
    num_heads: int
    old_kv_heads: int
    new_kv_heads: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    dtype: torch.dtype

    def __str__(self) -> str:
        return (
            f"wrote {self.out_dir}: {self.old_kv_heads} -> {self.new_kv_heads} KV heads for {self.num_heads} "
            f"query heads; KV cache {self.kv_bytes_per_token_before:,} -> {self.kv_bytes_per_token_after:,} "
            f"bytes per token in {str(self.dtype).removeprefix('torch.')}"
        )


def pool_kv_heads(tensor: torch.Tensor, new_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a k/v projection weight or bias (head-major) pooled from ``rows/head_dim`` to ``new_kv_heads`` heads.

    Neighbouring heads form a group, so query head h keeps reading a mean that includes its old KV head.
    """
    old_kv_heads = tensor.shape[0] // head_dim
    grouped = tensor.float().reshape(new_kv_heads, old_kv_heads // new_kv_heads, head_dim, *tensor.shape[1:])
    return grouped.mean(dim=1).reshape(new_kv_heads * head_dim, *tensor.shape[1:]).to(tensor.dtype)


def kv_bytes_per_token(config: ModelConfig, num_kv_heads: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one token adds to the cache, over all layers."""
    return 2 * config.num_layers * num_kv_heads * config.head_dim * dtype.itemsize


def convert_to_gqa(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_kv_heads: int,
    show_progress: bool = True,
) -> GqaConversion:
    """Write ``model_dir`` with its KV heads mean-pooled into ``num_kv_heads`` groups to ``out_dir``."""
    model_dir, out_dir = check_model_dir(model_dir), Path(out_dir)
    hf_config, config = _read_config(model_dir)
    _check_heads(config, num_kv_heads)
    _check_out_dir(model_dir, out_dir)
    files = find_weight_files(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {file: _tensor_names(file) for file in files}
    bar = tqdm(
        total=sum(map(len, names.values())), desc="pooling KV heads", unit="tensor", disable=not show_progress
    )
    total_bytes = 0
    with bar:
        for file in files:
            tensors = {}
            with safe_open(str(file), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {"format": "pt"}
                for name in names[file]:
                    tensor = f.get_tensor(name)
                    if _KV_PROJECTION.match(name):
                        tensor = pool_kv_heads(tensor, num_kv_heads, config.head_dim)
                    tensors[name] = tensor.contiguous()
                    total_bytes += tensor.numel() * tensor.element_size()
                    bar.update(1)
            save_file(tensors, str(out_dir / file.name), metadata=metadata)
            shutil.copymode(file, out_dir / file.name)
    _write_index(model_dir, out_dir, total_bytes)
    (out_dir / "config.json").write_text(
        json.dumps({**hf_config, "num_key_value_heads": num_kv_heads}, indent=2)
    )
    for pattern in _COPIED_FILES:
        for path in model_dir.glob(pattern):
            if path.is_file() and path.suffix != ".safetensors":
                shutil.copyfile(path, out_dir / path.name)
    return GqaConversion(
        out_dir,
        config.num_heads,
        config.num_kv_heads,
        num_kv_heads,
        kv_bytes_per_token(config, config.num_kv_heads, config.dtype),
        kv_bytes_per_token(config, num_kv_heads, config.dtype),
        config.dtype,
    )


def _read_config(model_dir: Path) -> tuple[dict, ModelConfig]:
    config = ModelConfig.from_dir(model_dir)  # a readable, consistent config.json, or a ConfigError
    hf_config = json.loads((model_dir / "config.json").read_text())
    architectures = hf_config.get("architectures") or [hf_config.get("model_type")]
    if not set(architectures) & set(GQA_ARCHITECTURES):
        raise GqaError(
            f"--to-gqa converts the Llama family ({', '.join(GQA_ARCHITECTURES)}); "
            f"{model_dir} is {', '.join(map(str, architectures))}"
        )
    if hf_config.get("quantization_config"):
        raise GqaError(f"{model_dir} is quantized; convert its float checkpoint to GQA, then quantize")
    return hf_config, config


def _check_heads(config: ModelConfig, num_kv_heads: int) -> None:
    heads, kv_heads = config.num_heads, config.num_kv_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise GqaError(f"--to-gqa needs a positive number of KV heads, got {num_kv_heads!r}")
    if num_kv_heads > kv_heads:
        raise GqaError(
            f"--to-gqa {num_kv_heads} is more than the model's {kv_heads} KV heads; pooling only reduces"
        )
    if heads % num_kv_heads:
        raise GqaError(f"--to-gqa {num_kv_heads} does not divide the model's {heads} attention heads")
    if kv_heads % num_kv_heads:
        raise GqaError(
            f"--to-gqa {num_kv_heads} does not divide the model's {kv_heads} KV heads into equal groups"
        )


def _check_out_dir(model_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == model_dir.resolve():
        raise GqaError(f"output {str(out_dir)!r} is the model directory itself; give a new directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise GqaError(f"output {str(out_dir)!r} is a file; give a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise GqaError(f"output directory {str(out_dir)!r} is not empty; give a new or empty directory")


def _tensor_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return list(f.keys())


def _write_index(model_dir: Path, out_dir: Path, total_bytes: int) -> None:
    """A sharded checkpoint keeps its shards and weight map; only the total size shrinks."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        spec = json.loads(index.read_text())
        spec["metadata"] = {**(spec.get("metadata") or {}), "total_size": total_bytes}
        (out_dir / index.name).write_text(json.dumps(spec, indent=2))
