"""Configuration: what the model is (``ModelConfig``, read from HF config.json by the model's
family in ``models/``) and how the engine runs it (``EngineConfig``: memory budget, batch
limits, dtype, device).

Both are plain dataclasses checked once at construction, so a bad setting fails early with a
message that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effinfer.quant.registry import SCHEMES


class ConfigError(ValueError):
    """The model directory or an engine setting cannot be used; the message says why."""


# HF `architectures` name -> its family's config.json parser. The families live in models/, a
# floor above this one, so models/registry.py registers them here when it is imported (which
# ``import effinfer`` does, through the engine).
_HF_CONFIG_PARSERS: dict[str, Callable[[dict], ModelConfig]] = {}


def register_hf_config_parser(architecture: str, parser: Callable[[dict], ModelConfig]) -> None:
    """Let ``ModelConfig.from_hf`` read config.json files of ``architecture`` with ``parser``."""
    _HF_CONFIG_PARSERS[architecture] = parser


def supported_architectures() -> list[str]:
    """The HF ``architectures`` names with a registered parser (every family in models/registry.py)."""
    return list(_HF_CONFIG_PARSERS)


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
    # First positions every windowed layer keeps visible (StreamingLLM); set by EngineConfig.model_layout.
    attention_sinks: int = 0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in _POSITIVE_MODEL_FIELDS:
            _check_positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:  # rotary embeddings turn pairs of dimensions
            raise ConfigError(f"head_dim must be even, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if not (self.rope_theta > 0 and self.rms_norm_eps >= 0):
            raise ConfigError(
                f"rope_theta must be > 0 and rms_norm_eps >= 0, got {self.rope_theta} and {self.rms_norm_eps}"
            )
        if len(self.sliding_windows) not in (0, self.num_layers):
            raise ConfigError(
                f"{len(self.sliding_windows)} sliding-window entries for {self.num_layers} layers"
            )
        bad_windows = [w for w in self.sliding_windows if w is not None and not _is_positive_int(w)]
        if bad_windows:
            raise ConfigError(f"sliding_window must be a positive integer, got {bad_windows[0]!r}")
        if self.attention_sinks and (None in self.sliding_windows or len(set(self.sliding_windows)) != 1):
            raise ConfigError("attention sinks need the same sliding window on every layer")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"no config.json in model directory {str(path)!r}")
        try:
            hf = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path} is not valid JSON: {e}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config_path} cannot be read: {e}") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{config_path} must hold a JSON object, not {type(hf).__name__}")
        try:
            return cls.from_hf(hf)
        except ConfigError as e:
            raise ConfigError(f"{config_path}: {e}") from None

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """A config.json dict, parsed by the family of its first supported ``architectures`` name."""
        architectures = hf.get("architectures") or []
        arch = next((a for a in architectures if a in _HF_CONFIG_PARSERS), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {architectures or hf.get('model_type')!r}; "
                f"effinfer supports {', '.join(supported_architectures())}"
            )
        _check_hf_fields(hf)
        return _HF_CONFIG_PARSERS[arch](hf)


# The fields a config.json must have; the rest have defaults. ``ModelConfig`` field -> HF key.
_REQUIRED_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}
# config.json ``model_type`` of families without attention -> the required keys they lack.
_NO_ATTENTION_KEYS = {"mamba": ("num_attention_heads",)}
_POSITIVE_MODEL_FIELDS = (
    *_REQUIRED_HF_FIELDS, "num_kv_heads", "head_dim", "max_position_embeddings",
)  # fmt: skip
# What layers/activation.py and layers/rotary.py implement (config sits below layers, so the lists
# are repeated here to reject a bad config.json before any weight is read).
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive_int(name: str, value) -> None:
    if not _is_positive_int(value):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_hf_fields(hf: dict) -> None:
    """The required config.json fields are present and usable (before any arithmetic on them)."""
    lacking = _NO_ATTENTION_KEYS.get(hf.get("model_type"), ())
    required = [key for key in _REQUIRED_HF_FIELDS.values() if key not in lacking]
    missing = [key for key in required if hf.get(key) is None]
    if missing:
        raise ConfigError(f"missing required field(s) {', '.join(missing)}")
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")
    for key in (*required, *(k for k in optional if hf.get(k) is not None)):
        _check_positive_int(key, hf[key])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    """cpu, cuda or cuda:N, where that CUDA device exists."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")


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
ONLINE_QUANTIZATION = (None, *SCHEMES)
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
    # Quantize a float checkpoint's decoder weights while loading: None or a name in quant/registry.SCHEMES.
    quantization: str | None = None
    # KV-cache storage: "auto" (the model dtype) or "int8" (one scale per token and KV head; ~2x the blocks).
    kv_cache_dtype: str = "auto"
    # Cut long prompts into chunks that share a step with running decodes (max_num_batched_tokens each).
    enable_chunked_prefill: bool = False
    # Speculative decoding (effinfer/spec): a draft model's path, or "ngram" for prompt lookup.
    speculative_model: str | None = None
    num_speculative_tokens: int = 4  # draft tokens proposed per step
    # Prompt lookup matches the longest n-gram in [min, max] that ends the sequence.
    ngram_prompt_lookup_max: int = 4
    ngram_prompt_lookup_min: int = 1
    # Pick each step's draft count in [0, num_speculative_tokens] from measured acceptance and step
    # cost (spec/adaptive.py). On by default: on a quiet machine it ran within 5% of the better of
    # fixed k and plain decoding at batch 1, 4 and 16, where fixed k lost 42% at batch 16
    # (docs/speculative-decoding.md). Off pins k, e.g. for seeded runs that must repeat token for
    # token (adaptive choices follow measured step times).
    speculative_adaptive: bool = True
    # Every layer attends to the last sliding_window tokens plus the first attention_sinks
    # (StreamingLLM, layers/attention_sinks.py); max_model_len may then pass the trained context.
    sliding_window: int | None = None
    attention_sinks: int = 0
    # Ranks that split each layer's heads and MLP (engine/executor.py, layers/parallel.py) and
    # stages that split the layers; 1 x 1 is one process.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

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
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if not _is_positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_num_batched_tokens", "max_model_len", "num_threads"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_positive_int(self.num_speculative_tokens):
            raise ConfigError(
                f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens!r}"
            )
        if not (
            _is_positive_int(self.ngram_prompt_lookup_min)
            and _is_positive_int(self.ngram_prompt_lookup_max)
            and self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max
        ):
            raise ConfigError(
                "need 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max, got "
                f"{self.ngram_prompt_lookup_min!r} and {self.ngram_prompt_lookup_max!r}"
            )
        if self.sliding_window is not None and not _is_positive_int(self.sliding_window):
            raise ConfigError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.attention_sinks != 0 and not _is_positive_int(self.attention_sinks):
            raise ConfigError(f"attention_sinks must be a positive integer, got {self.attention_sinks!r}")
        if self.attention_sinks and self.sliding_window is None:
            raise ConfigError("attention_sinks needs a sliding window: give --sliding-window W as well")
        if self.device == "auto":
            self.device = default_device()
        _check_device(self.device)

    def model_layout(self, model_config: ModelConfig) -> ModelConfig:
        """``model_config`` with ``sliding_window`` and ``attention_sinks`` applied to every layer."""
        if self.sliding_window is None:
            return model_config
        windows = [self.sliding_window] * model_config.num_layers
        return dataclasses.replace(
            model_config, sliding_windows=windows, attention_sinks=self.attention_sinks
        )

    def context_length(self, model_config: ModelConfig) -> int:
        """The longest sequence to serve: ``max_model_len``, by default the trained context.

        Past the trained context only a model whose layers all attend to a window keeps its
        attention within the distances it was trained on.
        """
        trained = model_config.max_position_embeddings
        if self.max_model_len is None or self.max_model_len <= trained:
            return self.max_model_len or trained
        if not model_config.sliding_windows or None in model_config.sliding_windows:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's trained context of {trained} "
                "tokens; that needs a sliding window on every layer (--sliding-window W, best with "
                "--attention-sinks 4)"
            )
        return self.max_model_len

    def resolve_dtype(self, model_config: ModelConfig) -> torch.dtype:
        if self.dtype == "auto":
            dtype = model_config.dtype
            # float16 on CPU has no fast kernels; bfloat16 keeps its range and runs on AMX/AVX-512.
            if dtype == torch.float16 and self.device == "cpu":
                dtype = torch.bfloat16
            return dtype
        return parse_dtype(self.dtype)


def parse_bytes(text: str) -> int:
    """A size such as ``512M``, ``2G`` or ``1048576`` in bytes (binary units); for ``--kv-cache-memory``."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M or 2G)") from None


@dataclass(frozen=True)
class _EngineFlag:
    """One ``EngineConfig`` field as a command-line flag; its default is the field's."""

    field: str
    flag: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    disables: bool = False  # a switch that turns a field that defaults to True off
    enables: bool = False  # a switch that turns a field that defaults to False on


class EngineArgs:
    """The engine settings as command-line flags, shared by every command that loads a model.

    Each flag maps to one ``EngineConfig`` field and takes its default from the dataclass, so a
    default is written once; ``effinfer generate``, ``effinfer serve`` and ``LLM(**kwargs)`` agree.

        EngineArgs.add_cli_args(parser)
        config = EngineArgs.from_cli_args(parser.parse_args())
    """

    FLAGS = (
        _EngineFlag("dtype", "--dtype", "auto (from config.json), float32, bfloat16, float16"),
        _EngineFlag("device", "--device", "auto, cpu, cuda, cuda:N"),
        _EngineFlag(
            "kv_cache_memory",
            "--kv-cache-memory",
            "KV-cache budget in bytes (e.g. 512M, 2G); "
            "default: --kv-cache-memory-fraction of the free memory",
            type=parse_bytes,
        ),  # fmt: skip
        _EngineFlag(
            "kv_cache_memory_fraction", "--kv-cache-memory-fraction", "share of free memory for KV", float
        ),
        _EngineFlag("max_num_seqs", "--max-num-seqs", "most sequences in a batch", int),
        _EngineFlag("max_model_len", "--max-model-len", "context length limit (default: the model's)", int),
        _EngineFlag("block_size", "--block-size", "tokens per KV block", int),
        _EngineFlag(
            "sliding_window", "--sliding-window", "every layer attends to the last W tokens only", int
        ),
        _EngineFlag(
            "attention_sinks",
            "--attention-sinks",
            "also keep the first N tokens visible (StreamingLLM; needs --sliding-window): "
            "generation past the trained context with bounded KV",
            int,
        ),
        _EngineFlag("enable_prefix_caching", "--no-prefix-caching", "disable prefix caching", disables=True),
        _EngineFlag("num_threads", "--threads", "CPU threads (default: the cores available)", int),
        _EngineFlag(
            "quantization",
            "--quantization",
            "quantize a float checkpoint's weights while loading: "
            + "; ".join(f"{s.name}: {s.description}" for s in SCHEMES.values())
            + " (see `effinfer quantize` for GPTQ/AWQ)",
            choices=tuple(q for q in ONLINE_QUANTIZATION if q is not None),
        ),  # fmt: skip
        _EngineFlag("max_num_batched_tokens", "--max-num-batched-tokens", "token budget of one step", int),
        _EngineFlag(
            "enable_chunked_prefill",
            "--enable-chunked-prefill",
            "cut long prompts into chunks that run alongside the decodes (budget: --max-num-batched-tokens)",
            enables=True,
        ),
        _EngineFlag(
            "speculative_model", "--speculative-model", 'draft model (HF directory or .gguf) or "ngram"'
        ),
        _EngineFlag("num_speculative_tokens", "--num-speculative-tokens", "draft tokens per step", int),
        _EngineFlag("ngram_prompt_lookup_max", "--ngram-prompt-lookup-max", "longest n-gram to match", int),
        _EngineFlag("ngram_prompt_lookup_min", "--ngram-prompt-lookup-min", "shortest n-gram to match", int),
        _EngineFlag(
            "speculative_adaptive",
            "--no-speculative-adaptive",
            "always draft --num-speculative-tokens instead of adapting the count to the measured "
            "acceptance and batch size",
            disables=True,
        ),
        _EngineFlag(
            "tensor_parallel_size",
            "--tensor-parallel-size",
            "processes that split each layer (tensor parallelism); started here, or one per rank under torchrun",
            int,
        ),
        _EngineFlag(
            "pipeline_parallel_size",
            "--pipeline-parallel-size",
            "processes that split the layers into stages",
            int,
        ),
        _EngineFlag(
            "kv_cache_dtype",
            "--kv-cache-dtype",
            "KV-cache storage: auto (the model dtype) or int8 (per token and head scales)",
            choices=KV_CACHE_DTYPES,
        ),  # fmt: skip
    )

    @staticmethod
    def defaults() -> dict[str, Any]:
        """``EngineConfig``'s field defaults, by field name."""
        return {
            f.name: f.default
            for f in dataclasses.fields(EngineConfig)
            if f.default is not dataclasses.MISSING
        }

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Adds ``--model`` and one flag per engine setting, in an "engine" group."""
        group = parser.add_argument_group("engine")
        group.add_argument(
            "--model", help="HF model directory or .gguf file (default: the built-in default model)"
        )
        defaults = cls.defaults()
        for spec in cls.FLAGS:
            default = defaults[spec.field]
            if spec.disables or spec.enables:
                action = "store_false" if spec.disables else "store_true"
                group.add_argument(spec.flag, dest=spec.field, action=action, default=default, help=spec.help)
                continue
            shown = "" if default is None else f" (default: {default})"
            metavar = None if spec.choices else spec.flag.removeprefix("--").replace("-", "_").upper()
            group.add_argument(
                spec.flag, dest=spec.field, type=spec.type, choices=spec.choices, default=default,
                metavar=metavar, help=spec.help + shown,
            )  # fmt: skip

    @classmethod
    def cli_kwargs(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The ``EngineConfig`` fields the flags set, as keyword arguments (for ``LLM(model, **kwargs)``)."""
        return {spec.field: getattr(args, spec.field) for spec in cls.FLAGS}

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        """The ``EngineConfig`` that the flags ``add_cli_args`` added describe."""
        return EngineConfig(**cls.cli_kwargs(args))
