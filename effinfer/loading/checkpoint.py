"""Open a model checkpoint, whatever its format, and hand the engine what it needs.

``open_checkpoint`` tells a GGUF file from an HF model directory (config.json plus safetensors),
reads the model's config and tokenizer, and returns a ``Checkpoint`` whose ``load_model`` builds
the model with its weights. ``EngineConfig.quantization`` quantizes a float HF checkpoint while
it loads (``loading/online_quant.py``); a GGUF file is already quantized and refuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from effinfer.config import ConfigError, ModelConfig
from effinfer.default_model import default_model_path
from effinfer.loading.builder import finalize_model
from effinfer.loading.gguf import GGUFFile, is_gguf_file
from effinfer.loading.online_quant import quantize_on_load
from effinfer.loading.safetensors import check_model_dir, load_model
from effinfer.models.stage import PipelineStage
from effinfer.tokenizer import Tokenizer


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The checkpoint to open: ``model``, or the built-in default model when it is None."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"model path {str(model)!r} does not exist")
    return path


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint: its config and tokenizer are read, its weights not yet."""

    path: Path
    model_config: ModelConfig
    tokenizer: Tokenizer
    gguf: GGUFFile | None  # the parsed header when the checkpoint is a GGUF file
    quantization: str | None  # the scheme a float checkpoint is quantized to while loading

    def load_model(
        self,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        show_progress: bool = True,
        stage: PipelineStage | None = None,
    ) -> torch.nn.Module:
        """The model with its weights, on ``device``, ready for the kernels; with ``stage``, only that
        pipeline stage's modules and weights."""
        config = self.model_config
        if self.gguf is not None:
            return self.gguf.load_model(config, dtype, device, max_positions, show_progress, stage)
        if self.quantization is None:
            return load_model(self.path, config, dtype, device, max_positions, show_progress, stage=stage)
        # Float weights first, quantized before the kernels pack them.
        model = load_model(
            self.path, config, dtype, device, max_positions, show_progress, finalize=False, stage=stage
        )
        with torch.no_grad():
            quantize_on_load(model, self.quantization, show_progress)
        return finalize_model(model, device, dtype)


def open_checkpoint(model: str | os.PathLike, quantization: str | None = None) -> Checkpoint:
    """Read the config and tokenizer of a GGUF file or an HF model directory (no weights yet)."""
    if is_gguf_file(model):
        if quantization:
            raise ConfigError("a GGUF file is already quantized: leave quantization unset")
        gguf = GGUFFile(model)
        return Checkpoint(Path(model), gguf.model_config(), gguf.tokenizer(), gguf, None)
    path = check_model_dir(model)
    return Checkpoint(path, ModelConfig.from_dir(path), Tokenizer.from_dir(path), None, quantization or None)
