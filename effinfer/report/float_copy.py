"""A float HF copy of a GGUF model, so weight techniques (int8, GPTQ, ...) can start from float weights.

A GGUF file is already quantized, and ``--quantization`` / ``effinfer quantize`` start from a float
checkpoint. The copy is an ordinary HF directory: effinfer's own GGUF reader dequantizes the
tensors under their HF names (``loading/gguf.hf_tensors``, the path ``LLM(file.gguf)`` loads
through), stored in bfloat16, the dtype effinfer runs quantized GGUF files in; transformers writes
config.json and the tokenizer files from the GGUF metadata (its own reading of the format).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

from effinfer.loading.gguf import GGUFFile, hf_tensors
from effinfer.report.techniques import Target


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def write_float_copy(target: Target) -> Path:
    import transformers

    out = target.workdir / "float-copy"
    out.mkdir(parents=True, exist_ok=True)
    gguf_path = target.model
    config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.dtype = torch.bfloat16
    config.architectures = [target.config.architecture]  # what effinfer's config reader keys on
    config.save_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)
    gguf = GGUFFile(gguf_path)
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t, _ in hf_tensors(gguf, target.config)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
