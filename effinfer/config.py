"""Configuration: what the model is (``ModelConfig``, read from HF config.json) and how the
engine runs it (``EngineConfig``: memory budget, batch limits, dtype, device).

Both are plain dataclasses checked once at construction, so a bad setting fails early with a
message that names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ConfigError(ValueError):
    """The model directory or an engine setting cannot be used; the message says why."""


# HF `architectures` names effinfer runs, and the flags that set them apart.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    # Per layer: None for full attention, else the number of most recent tokens a query may see.
    sliding_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"no config.json in model directory {str(path)!r}")
        try:
            hf = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path} is not valid JSON: {e}") from e
        return cls.from_hf(hf)

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        architectures = hf.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {architectures or hf.get('model_type')!r}; "
                f"effinfer supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        flags = SUPPORTED_ARCHITECTURES[arch]
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        num_layers = hf["num_hidden_layers"]
        # transformers 5 nests rope settings in `rope_parameters`; 4.x used rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        if rope_scaling is None and hf.get("rope_scaling"):
            rope_scaling = dict(hf["rope_scaling"])
        if rope_scaling is not None:
            rope_scaling.setdefault("rope_type", rope_scaling.get("type"))
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", flags.get("attention_bias", False))),
            qk_norm=flags.get("qk_norm", False),
            hidden_act=hf.get("hidden_act", "silu"),
            sliding_windows=_sliding_windows(hf, arch, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            dtype=parse_dtype(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )


def _sliding_windows(hf: dict, arch: str, num_layers: int) -> list[int | None]:
    window = hf.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return [None] * num_layers
    layer_types = hf.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        first_sliding = hf.get("max_window_layers", num_layers)
        return [window if i >= first_sliding else None for i in range(num_layers)]
    return [window] * num_layers


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


# Schemes ``EngineConfig.quantization`` applies at load time (``loading/online_quant.py``).
ONLINE_QUANTIZATION = (None, "int8", "int4", "fp8", "nf4", "llm_int8")
# How the paged KV cache stores keys and values (``layers/attention.py``).
KV_CACHE_DTYPES = ("auto", "int8")


@dataclass
class EngineConfig:
    """How the engine runs a model. Defaults suit one CPU or one GPU."""

    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    block_size: int = 16
    # KV-cache budget: an absolute number of bytes wins over a fraction of the free memory.
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    seed: int = 0
    show_progress: bool = True
    # Quantize a float checkpoint's decoder weights while loading (RTN): None, "int8", "int4", "fp8".
    quantization: str | None = None
    # KV-cache storage: "auto" (the model dtype) or "int8" (one scale per token and KV head; ~2x the blocks).
    kv_cache_dtype: str = "auto"
    # Cut long prompts into chunks that share a step with running decodes (max_num_batched_tokens each).
    enable_chunked_prefill: bool = False
    # Speculative decoding (effinfer/spec): a draft model's path, or "ngram" for prompt lookup.
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None
    ngram_prompt_lookup_max: int | None = None
    ngram_prompt_lookup_min: int | None = None

    def __post_init__(self) -> None:
        if self.quantization not in ONLINE_QUANTIZATION:
            choices = ", ".join(str(q) for q in ONLINE_QUANTIZATION)
            raise ConfigError(f"unknown quantization {self.quantization!r}; choose from {choices}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(
                f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}"
            )
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.device == "auto":
            self.device = default_device()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")

    def resolve_dtype(self, model_config: ModelConfig) -> torch.dtype:
        if self.dtype == "auto":
            dtype = model_config.dtype
            # float16 on CPU has no fast kernels; bfloat16 keeps its range and runs on AMX/AVX-512.
            if dtype == torch.float16 and self.device == "cpu":
                dtype = torch.bfloat16
            return dtype
        return parse_dtype(self.dtype)
