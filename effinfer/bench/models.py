"""Random-weight Llama checkpoints for benchmarking: the real shapes of a known model, no download.

``make_random_model(out_dir, preset="tinyllama-1.1b")`` writes an HF ``LlamaForCausalLM``
directory (config.json, model.safetensors, tokenizer) that both effinfer and transformers load.
Speed does not depend on the weights' values, so a random model measures what a trained one would.
Each tensor is drawn directly in the target dtype, so a 1.1B bf16 model needs ~2.2 GB, not 4.4 + 2.2.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from effinfer.config import parse_dtype

PRESETS: dict[str, dict] = {
    # TinyLlama-1.1B (Zhang et al. 2024): Llama 2 architecture with GQA, Llama 2 vocabulary.
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    # Qwen2.5-1.5B's shapes (Qwen team 2024) in the Llama layout: no q/k/v bias, untied output head.
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
    # For tests: the same vocabulary, everything else as small as it gets.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=32000,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
}

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_INIT_STD = 0.02


def hf_config(preset: str, dtype: str = "bfloat16") -> dict:
    """The config.json of a preset, readable by transformers 4.x (rope_theta) and 5.x (rope_parameters)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    dtype_name = _DTYPE_NAMES[parse_dtype(dtype)]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["hidden_size"] // p["num_attention_heads"],
        "vocab_size": p["vocab_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_theta": p["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": p["rope_theta"]},
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": _INIT_STD,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF checkpoint names and shapes of a Llama config (untied: lm_head is its own tensor)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes.update(
            {
                f"{prefix}.input_layernorm.weight": (h,),
                f"{prefix}.self_attn.q_proj.weight": (q, h),
                f"{prefix}.self_attn.k_proj.weight": (kv, h),
                f"{prefix}.self_attn.v_proj.weight": (kv, h),
                f"{prefix}.self_attn.o_proj.weight": (h, q),
                f"{prefix}.post_attention_layernorm.weight": (h,),
                f"{prefix}.mlp.gate_proj.weight": (i, h),
                f"{prefix}.mlp.up_proj.weight": (i, h),
                f"{prefix}.mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_random_model(
    out_dir: str | os.PathLike,
    preset: str = "tinyllama-1.1b",
    dtype: str = "bfloat16",
    seed: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a random-init HF Llama directory for ``preset`` and return its path.

    Matrices are N(0, 0.02), norms are 1. The tokenizer is copied from ``tokenizer_dir`` (default:
    the Llama 2 tokenizer in ../shared/data/tokenizers/llama2 when present), else a byte-level one
    padded to the model's vocabulary is built.
    """
    config = hf_config(preset, dtype)
    torch_dtype = parse_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        tensor = torch.empty(shape, dtype=torch_dtype)
        if len(shape) == 1:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, _INIT_STD, generator=generator)
        tensors[name] = tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )
    source = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    if source is not None and (source / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    else:
        write_byte_level_tokenizer(out, config["vocab_size"])
    return out


def default_tokenizer_dir() -> Path | None:
    """The Llama 2 tokenizer (vocab 32000) in the shared reference data, if this checkout has it."""
    candidates = []
    if os.environ.get("EFFINFER_SHARED_DATA"):
        candidates.append(Path(os.environ["EFFINFER_SHARED_DATA"]))
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    for data in candidates:
        path = data / "tokenizers" / "llama2"
        if (path / "tokenizer.json").is_file():
            return path
    return None


def write_byte_level_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level tokenizer (no merges) whose vocabulary is padded with filler tokens to ``vocab_size``,
    so every id a random model can emit decodes to something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )
