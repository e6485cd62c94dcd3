"""Write a trained model as a standard Hugging Face directory.

effinfer fuses q/k/v and gate/up into one ``Linear`` each; the checkpoint splits them back into
HF's separate tensors (``Linear.shard``), the inverse of what loading does, so that both
``effinfer.LLM(dir)`` and ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` read it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from effinfer.config import parse_dtype
from effinfer.models.llama import LlamaForCausalLM
from effinfer.train.bpe import TOKENIZER_FILES


def hf_state_dict(model: LlamaForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our parameters under their HF checkpoint names, fused projections split apart."""
    shard_names: dict[str, list[str]] = {}  # our fused module name -> HF names by shard index
    for hf_name, (ours, _shard) in sorted(model.packed_modules.items(), key=lambda item: item[1][1]):
        shard_names.setdefault(ours, []).append(hf_name)
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        module_name, _, param_name = name.rpartition(".")
        module = modules[module_name]
        fused = module_name.rpartition(".")[2]
        if len(getattr(module, "shard_sizes", [])) > 1:
            for shard, hf_name in enumerate(shard_names[fused]):
                hf_full = name.replace(f".{fused}.", f".{hf_name}.")
                tensors[hf_full] = module.shard(param_name, shard)
        else:
            tensors[name] = param
    return {name: t.detach().to("cpu", dtype).contiguous().clone() for name, t in tensors.items()}


def export_hf(
    model: LlamaForCausalLM,
    hf_config: dict,
    tokenizer_dir: Path,
    out_dir: Path,
    save_dtype: str = "bfloat16",
    max_new_tokens: int = 256,
) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files."""
    dtype = parse_dtype(save_dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**hf_config, "dtype": dtype_name}
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "max_new_tokens": max_new_tokens,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = hf_state_dict(model, dtype)
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / "model.safetensors")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir
