"""A float HF copy of a GGUF model, so weight techniques (int8, GPTQ, ...) can start from float weights.

A GGUF file is already quantized, and ``--quantization`` / ``effinfer quantize`` start from a float
checkpoint. transformers dequantizes a GGUF file into its own model (an outside implementation of
the block formats) and writes it with its tokenizer as an ordinary HF directory in bfloat16, the
dtype effinfer runs quantized GGUF files in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from effinfer.report.techniques import Target


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def write_float_copy(target: Target) -> Path:
    import transformers

    out = target.workdir / "float-copy"
    out.mkdir(parents=True, exist_ok=True)
    gguf = target.model
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out
