"""The techniques a report can measure: one registry entry each.

An entry says what the technique is, whether it applies to the user's model and device (and why
not), what it costs relative to measuring the baseline, how to obtain the model and engine
settings that switch it on (engine keyword arguments, and optionally a preparation step such as
``effinfer quantize`` writing a new checkpoint), and the command lines that reproduce it. Adding a
technique (pruning, low-rank, ...) is one ``register_technique`` call; nothing else in the report changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effinfer.compress.lowrank import LowRankOptions
from effinfer.compress.lowrank_cli import compress_low_rank
from effinfer.compress.prune.masks import SparsityPattern
from effinfer.compress.prune.pipeline import PruneOptions, prune
from effinfer.compress.quant.pipeline import QuantizeOptions, quantize
from effinfer.config import ConfigError, EngineArgs, ModelConfig
from effinfer.loading.gguf import GGUFFile, is_gguf_file
from effinfer.quant.registry import SCHEMES


class ReportError(ConfigError):
    """The report cannot run as asked (an unknown technique, a bad budget); the message says why."""


@dataclass
class Target:
    """The user's model as the techniques see it."""

    model: Path  # an HF directory or a .gguf file
    config: ModelConfig
    device: str  # "cpu" or "cuda[:N]"
    workdir: Path  # where prepared checkpoints go
    is_gguf: bool = False
    quantized_checkpoint: bool = False  # config.json carries a quantization_config
    # A float HF copy of a GGUF model, written on first use (``float_copy.py``); None: not made yet.
    float_dir: Path | None = None
    make_float_copy: Callable[[Target], Path] | None = None

    @classmethod
    def open(cls, model: Path, device: str, workdir: Path) -> Target:
        if is_gguf_file(model):
            return cls(model, GGUFFile(model).model_config(), device, workdir, is_gguf=True)
        config = ModelConfig.from_dir(model)
        raw = json.loads((model / "config.json").read_text())
        return cls(model, config, device, workdir, quantized_checkpoint=bool(raw.get("quantization_config")))

    def float_checkpoint(self) -> Path:
        """An HF directory with float weights: the model itself, or a float copy of a GGUF file."""
        if not self.is_gguf:
            return self.model
        if self.float_dir is None:
            if self.make_float_copy is None:
                raise ReportError("no way to write a float copy of the GGUF file")
            self.float_dir = self.make_float_copy(self)
        return self.float_dir

    @property
    def has_float_weights(self) -> bool:
        return not self.quantized_checkpoint and (not self.is_gguf or self.make_float_copy is not None)


@dataclass(frozen=True)
class Prepared:
    """What one technique runs: the model to load, engine settings, and the steps that made the model."""

    model: Path
    engine_kwargs: dict[str, Any]
    setup_commands: list[str] = field(default_factory=list)  # e.g. the `effinfer quantize` line


@dataclass(frozen=True)
class Technique:
    name: str  # what --techniques takes
    label: str  # for tables and plots
    description: str
    value: int  # higher runs first when the budget cannot hold everything
    cost: float  # time relative to the baseline row (load + the same measurements)
    prepare: Callable[[Target], Prepared]
    applies: Callable[[Target], str | None] = lambda target: None  # None, or why it does not apply
    # Quality is scored through the paged KV cache (the cache is what the technique changes).
    scores_through_cache: bool = False
    speculative: bool = False


TECHNIQUES: dict[str, Technique] = {}


def register_technique(technique: Technique) -> Technique:
    if technique.name in TECHNIQUES:
        raise ValueError(f"technique {technique.name!r} is registered twice")
    TECHNIQUES[technique.name] = technique
    return technique


def select(names: list[str] | None) -> list[Technique]:
    """The techniques named (all when None), the baseline first; an unknown name is a ``ReportError``."""
    if names is None:
        return list(TECHNIQUES.values())
    unknown = [n for n in names if n not in TECHNIQUES]
    if unknown:
        raise ReportError(f"unknown technique(s) {', '.join(unknown)}; choose from {', '.join(TECHNIQUES)}")
    chosen = ["baseline", *[n for n in dict.fromkeys(names) if n != "baseline"]]
    return [TECHNIQUES[n] for n in chosen]


def engine_flags(engine_kwargs: dict[str, Any]) -> list[str]:
    """The ``EngineArgs`` flags that set ``engine_kwargs`` (every command that loads a model takes them)."""
    flags = []
    for spec in EngineArgs.FLAGS:
        if spec.field not in engine_kwargs:
            continue
        value = engine_kwargs[spec.field]
        if spec.disables or spec.enables:
            if bool(value) == spec.enables:
                flags.append(spec.flag)
        elif value is not None:
            flags += [spec.flag, str(value)]
    return flags


# -------------------------------------------------------------------- the entries


def _as_given(target: Target, **engine_kwargs) -> Prepared:
    return Prepared(target.model, engine_kwargs)


def _needs_float_weights(target: Target) -> str | None:
    if target.quantized_checkpoint:
        return "the checkpoint is already quantized; weight schemes start from float weights"
    if not target.has_float_weights:
        return "needs float weights (a GGUF file is dequantized with transformers, which is not installed)"
    return None


def _float_copy_setup(target: Target) -> list[str]:
    if not target.is_gguf:
        return []
    return [f"# {target.float_dir}: float copy of {target.model} written by effinfer report (float_copy.py)"]


register_technique(Technique(
    "baseline", "baseline", "the model as given, default engine settings", 1000, 1.0,
    lambda t: _as_given(t),
))  # fmt: skip


def _float_applies(target: Target) -> str | None:
    if not target.is_gguf:
        return "the model already has float weights (the baseline)"
    return _needs_float_weights(target)


register_technique(Technique(
    "float", "float (dequantized)", "the GGUF file's weights dequantized to bfloat16: what quantization saves",
    58, 1.5, lambda t: Prepared(t.float_checkpoint(), {}, _float_copy_setup(t)), _float_applies,
))  # fmt: skip


def _online_scheme(name: str, description: str, value: int, cost: float) -> Technique:
    def prepare(target: Target) -> Prepared:
        model = target.float_checkpoint()
        return Prepared(model, {"quantization": name}, _float_copy_setup(target))

    return Technique(name, name, f"{description} (quantized while loading)", value, cost, prepare,
                     _needs_float_weights)  # fmt: skip


# How much each weight scheme is worth trying first on a short budget (the common ones first).
_SCHEME_VALUE = {"int8": 90, "int4": 88, "nf4": 70, "w8a8": 60, "fp8": 50, "llm_int8": 40, "fp4": 35}
for _scheme in SCHEMES.values():
    register_technique(
        _online_scheme(_scheme.name, _scheme.description, _SCHEME_VALUE.get(_scheme.name, 30), 1.3)
    )

register_technique(Technique(
    "kv-int8", "KV int8", "int8 KV cache, one scale per token and head (--kv-cache-dtype int8)", 85, 1.3,
    lambda t: _as_given(t, kv_cache_dtype="int8"), scores_through_cache=True,
))  # fmt: skip

register_technique(Technique(
    "ngram-spec", "n-gram speculation",
    "prompt-lookup speculative decoding, adaptive draft length (--speculative-model ngram)", 80, 1.2,
    lambda t: _as_given(t, speculative_model="ngram"), speculative=True,
))  # fmt: skip


def _window(target: Target) -> int:
    return max(16, target.config.max_position_embeddings // 4)


def _window_applies(target: Target) -> str | None:
    if target.config.sliding_windows and None not in target.config.sliding_windows:
        return "every layer already attends to a sliding window"
    return None


register_technique(Technique(
    "sliding-window", "sliding window + 4 sinks",
    "StreamingLLM: every layer sees the last W tokens (a quarter of the context) and 4 sink tokens", 55, 1.3,
    lambda t: _as_given(t, sliding_window=_window(t), attention_sinks=4), _window_applies,
    scores_through_cache=True,
))  # fmt: skip


def _calibrated(method: str, label: str, value: int, cost: float) -> Technique:
    """GPTQ / AWQ: ``effinfer quantize`` writes a checkpoint from a calibration text, then it is loaded."""

    def prepare(target: Target) -> Prepared:
        source = target.float_checkpoint()
        out = target.workdir / f"{method}-int4"
        # A short calibration (32 rows of 256 tokens) keeps the report's budget; see docs/report.md.
        options = QuantizeOptions(method=method, bits=4, group_size=128, num_samples=32, seq_len=256)
        quantize(source, out, options, show_progress=False)
        command = (f"effinfer quantize --model {source} --method {method} --bits 4 --group-size 128 "
                   f"--num-samples 32 --seq-len 256 --out {out}")  # fmt: skip
        return Prepared(out, {}, [*_float_copy_setup(target), command])

    return Technique(method, label, f"{label}: 4-bit, groups of 128, calibrated on the held-out text",
                     value, cost, prepare, _needs_float_weights)  # fmt: skip


# Calibrated methods cost far more than a row's measurements, which are mostly fixed overheads.
# Relative to the quick rows (10-27 s each) of the SmolLM2-135M report of 2026-12-05, GPTQ's row
# took 151 s and AWQ's 753 s (its scale and clipping searches run the calibration rows through
# each block dozens of times): costs 10 and 50, so a 12-minute budget skips AWQ instead of overrunning.
register_technique(_calibrated("gptq", "GPTQ int4", 75, 10.0))
register_technique(_calibrated("awq", "AWQ int4", 65, 50.0))


def _pruned(method: str, sparsity: str, label: str, value: int, cost: float) -> Technique:
    """``effinfer prune``: a sparse checkpoint from the model (a GGUF file is dequantized first).

    Unstructured and N:M zeros do not make these CPU kernels faster: the row shows what the
    sparsity costs in quality (the step a sparse kernel, or a quantizer after it, would build on).
    """

    def prepare(target: Target) -> Prepared:
        out = target.workdir / f"{method}-{sparsity.replace(':', 'of')}"
        # The same short calibration as GPTQ / AWQ (32 rows of 256 tokens).
        options = PruneOptions(
            method=method, pattern=SparsityPattern.parse(sparsity), num_samples=32, seq_len=256
        )
        prune(target.model, out, options, show_progress=False)
        command = (f"effinfer prune --model {target.model} --method {method} --sparsity {sparsity} "
                   f"--num-samples 32 --seq-len 256 --out {out}")  # fmt: skip
        return Prepared(out, {}, [command])

    return Technique(f"{method}-{sparsity}", label,
                     f"{label}: `effinfer prune`, calibrated on the held-out text (dense kernels: no speed-up here)",
                     value, cost, prepare)  # fmt: skip


register_technique(_pruned("sparsegpt", "0.5", "SparseGPT 50%", 45, 10.0))
register_technique(_pruned("wanda", "2:4", "Wanda 2:4", 44, 4.0))


def _low_rank(target: Target) -> Prepared:
    out = target.workdir / "low-rank-0.8"
    compress_low_rank(
        target.model, out, LowRankOptions(0.8), num_samples=32, seq_len=256, show_progress=False
    )
    command = (f"effinfer compress --model {target.model} --low-rank 0.8 --method svd-llm "
               f"--num-samples 32 --seq-len 256 --out {out}")  # fmt: skip
    return Prepared(out, {}, [command])


register_technique(Technique(
    "low-rank", "low-rank 80% (SVD-LLM)",
    "decoder Linears factorized into U·V keeping 80% of their parameters (`effinfer compress --low-rank 0.8`)",
    42, 5.0, _low_rank,
))  # fmt: skip
