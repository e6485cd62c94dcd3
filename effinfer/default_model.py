"""The built-in default model, used whenever no ``--model`` is given."""

from __future__ import annotations

from pathlib import Path

from effinfer.config import ConfigError

DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default-model"


def default_model_path() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ConfigError(
            f"no model given and the built-in default model is missing from {DEFAULT_MODEL_DIR}; "
            "pass --model PATH (an HF model directory)"
        )
    return DEFAULT_MODEL_DIR
