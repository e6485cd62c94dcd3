"""Load an HF model directory: config.json plus single or sharded ``*.safetensors``.

Tensors are memory-mapped and copied one at a time into parameters already allocated in the
target dtype, so peak memory is the model once, not the checkpoint plus the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from effinfer.config import ConfigError, ModelConfig
from effinfer.models.registry import model_class


class WeightsError(ConfigError):
    """The checkpoint's tensors are missing or do not fit the model."""


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


def load_model(
    path: str | os.PathLike,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    show_progress: bool = True,
) -> torch.nn.Module:
    path = check_model_dir(path)
    files = find_weight_files(path)
    cls = model_class(config.architecture)
    # Build on the meta device (no memory, no random init), then allocate in the target dtype.
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config, max_positions)
    finally:
        torch.set_default_dtype(previous_dtype)
    model.to_empty(device=device)
    model.tie_weights()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show_progress
    ) as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    bar.update(tensor.numel() * tensor.element_size())
                    target = model.checkpoint_target(name)
                    if target is None:
                        continue
                    ours, shard = target
                    if ours not in params:
                        raise WeightsError(
                            f"checkpoint tensor {name!r} in {file.name} has no place in {config.architecture}"
                        )
                    module_name, _, param_name = ours.rpartition(".")
                    module = modules[module_name]
                    if hasattr(module, "load_shard"):
                        module.load_shard(param_name, tensor, shard)
                    else:
                        param = params[ours]
                        if param.shape != tensor.shape:
                            raise WeightsError(
                                f"{name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                            )
                        param.data.copy_(tensor)
                    loaded.add(f"{ours}#{shard}")
    expected = set()
    for name, module in modules.items():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}" if name else param_name
            if full == "lm_head.weight" and config.tie_word_embeddings:
                continue
            shards = len(getattr(module, "shard_sizes", [0])) if param_name in ("weight", "bias") else 1
            expected.update(f"{full}#{s}" for s in range(shards))
    missing = sorted(expected - loaded)
    if missing:
        names = ", ".join(m.split("#")[0] for m in missing[:5])
        raise WeightsError(f"checkpoint in {str(path)!r} lacks {len(missing)} tensors, e.g. {names}")
    model.model.rotary.build_cache(device, dtype)
    shared = {id(p) for name, p in model.named_parameters() if name == "model.embed_tokens.weight"}
    for module in model.modules():
        if hasattr(module, "finalize"):
            module.finalize(release_weight=id(module.weight) not in shared)
    return model.eval()
