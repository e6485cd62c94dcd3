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


HELDOUT_DIR = Path(__file__).parent / "data" / "heldout"


def heldout_text_path(part: str) -> Path:
    """Text the default model never trained on (CPython 3.11.7 stdlib files held out by path hash).

    ``"calibration"`` (5 files) feeds quantizers that need sample activations; ``"evaluation"``
    (the other 6) is what quality is measured on, so calibration never sees the test text.
    """
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"held-out part must be 'calibration' or 'evaluation', got {part!r}")
    return HELDOUT_DIR / f"{part}.txt"
