"""``effinfer prune``: a model (HF directory or GGUF file) in, a pruned HF checkpoint out.

One function drives every method: load the model with plain float32 weights (a quantized GGUF is
dequantized first), cut calibration rows from a text file when the method looks at activations,
prune the decoder's Linear layers, and write an HF directory (config.json, model.safetensors,
tokenizer) that ``LLM(OUT)``, ``effinfer eval ppl --model OUT``, ``effinfer quantize --model OUT``
and transformers load like any other model. Unstructured and N:M pruning keep the shapes and
store zeros; structured pruning (``structured.py``) makes the matrices smaller and the config says so.

    effinfer prune --model M --method wanda --sparsity 0.5 --calib TEXT --out DIR
    effinfer prune --model M.gguf --method sparsegpt --sparsity 2:4 --out DIR
    effinfer prune --model M --method magnitude --sparsity 4:8 --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from effinfer.compress.calibration import calibration_batches
from effinfer.compress.prune.magnitude import prune_model_magnitude
from effinfer.compress.prune.masks import SparsityPattern, zero_share
from effinfer.compress.prune.sparsegpt import BLOCK_SIZE, DAMP, prune_model_sparsegpt
from effinfer.compress.prune.structured import prune_structured
from effinfer.compress.prune.wanda import prune_model_wanda
from effinfer.compress.quant.formats import TOKENIZER_FILES
from effinfer.compress.quant.pipeline import load_float_model
from effinfer.config import ConfigError, ModelConfig
from effinfer.default_model import heldout_text_path
from effinfer.layers.linear import Linear
from effinfer.loading.checkpoint import resolve_model_path
from effinfer.loading.gguf import ROPE_FREQS, GGUFFile, hf_config_from_gguf, is_gguf_file
from effinfer.loading.gguf import load_model as load_gguf_model
from effinfer.models.base import CausalLM
from effinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# config.json's ``model_type`` (what transformers dispatches on) of each architecture effinfer runs;
# a config made from GGUF metadata lacks it.
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}


@dataclass
class PruneOptions:
    method: str
    pattern: SparsityPattern
    calib: str | os.PathLike | None = None  # text file; None: the default model's held-out calibration text
    num_samples: int = 128
    seq_len: int = 512
    calib_stride: int | None = None  # None: rows apart, or overlapping when the text is too short
    damp: float = DAMP  # SparseGPT: Hessian dampening, share of the mean diagonal
    block_size: int = BLOCK_SIZE  # SparseGPT: columns per mask-selection and lazy-update block
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method == "structured" and self.pattern.is_n_m:
            raise ConfigError(
                "--method structured removes a share of heads and channels: give --sparsity 0.3, not N:M"
            )
        if self.num_samples < 1 or self.seq_len < 2:
            raise ConfigError("--num-samples must be >= 1 and --seq-len >= 2")
        if not self.damp > 0 or self.block_size < 1:
            raise ConfigError(
                f"--damp must be > 0 and --block-size >= 1, got {self.damp} and {self.block_size}"
            )


def _structured(model: CausalLM, options: PruneOptions, calib: torch.Tensor | None, progress: bool) -> None:
    prune_structured(model, calib, options.pattern.sparsity, show_progress=progress)


@dataclass(frozen=True)
class PruneMethod:
    """One pruning method: how it transforms a model (model, options, calibration rows, progress)."""

    name: str
    run: Callable[[CausalLM, PruneOptions, torch.Tensor | None, bool], None]
    needs_calibration: bool
    description: str


METHODS: dict[str, PruneMethod] = {m.name: m for m in (
    PruneMethod("magnitude", lambda model, o, calib, progress: prune_model_magnitude(model, o.pattern, progress),
                False, "smallest |W| of each row (no data)"),
    PruneMethod("wanda", lambda model, o, calib, progress: prune_model_wanda(model, calib, o.pattern, progress),
                True, "Wanda: |W| x input norm per row, no update"),
    PruneMethod("sparsegpt", lambda model, o, calib, progress: prune_model_sparsegpt(
        model, calib, o.pattern, o.damp, o.block_size, progress), True, "SparseGPT: OBS mask + weight update"),
    PruneMethod("structured", _structured, True, "remove attention heads and MLP channels (a smaller dense model)"),
)}  # fmt: skip


@dataclass
class SourceModel:
    """The model to prune, with what its output directory needs besides the weights."""

    model: CausalLM
    hf_config: dict
    tokenizer: Tokenizer
    directory: Path | None  # an HF directory: its tokenizer and generation files are copied


def load_source(path: Path, show_progress: bool = True) -> SourceModel:
    """An HF directory or a GGUF file (dequantized) as a float32 model with plain weights."""
    if not is_gguf_file(path):
        model, _ = load_float_model(path)
        hf_config = json.loads((path / "config.json").read_text())
        return SourceModel(model, hf_config, Tokenizer.from_dir(path), path)
    gguf = GGUFFile(path)
    config = gguf.model_config()
    if ROPE_FREQS in gguf.tensors:  # llama3 rope scaling, which llama.cpp stores as a tensor
        raise ConfigError(f"{path.name} keeps its rope scaling as a tensor; prune the HF checkpoint instead")
    model = load_gguf_model(
        gguf,
        config,
        torch.float32,
        torch.device("cpu"),
        config.max_position_embeddings,
        show_progress,
        finalize=False,
    )
    return SourceModel(model, hf_config_from_gguf(gguf), gguf.tokenizer(), None)


def calibration_rows(tokenizer: Tokenizer, options: PruneOptions) -> torch.Tensor:
    """Calibration token rows [num_samples, seq_len] from ``options.calib``."""
    path = Path(options.calib) if options.calib else heldout_text_path("calibration")
    if not path.is_file():
        raise ConfigError(f"calibration file {str(path)!r} does not exist")
    try:
        return calibration_batches(
            tokenizer,
            path,
            options.num_samples,
            options.seq_len,
            options.seed,
            options.calib_stride or "auto",
        )
    except ValueError as e:
        raise ConfigError(f"calibration file {str(path)!r}: {e}") from None


def prune(
    model_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    options: PruneOptions,
    show_progress: bool = True,
) -> Path:
    """Prune the model at ``model_path`` (None: the built-in default model) and write it to ``out_dir``."""
    path = resolve_model_path(model_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(
            f"--out {str(out_dir)!r} exists and is not an empty directory (nothing is overwritten)"
        )
    start = time.perf_counter()
    source = load_source(path, show_progress)
    for name, linear in source.model.compressible_linears():
        options.pattern.check_fits(name, linear.in_features)
    method = METHODS[options.method]
    calib = calibration_rows(source.tokenizer, options) if method.needs_calibration else None
    with torch.no_grad():
        method.run(source.model, options, calib, show_progress)
    info = {"method": options.method, "sparsity": str(options.pattern)}
    if calib is not None:
        info.update(calibration_rows=calib.shape[0], calibration_seq_len=calib.shape[1])
    save_pruned(source, out_dir, info)
    weights = [linear.weight for _, linear in source.model.compressible_linears()]
    count = sum(w.numel() for w in weights)
    zeros = sum(zero_share(w) * w.numel() for w in weights) / count
    print(f"{options.method} {options.pattern}: {count:,} decoder weights, {zeros:.1%} of them zero, "
          f"in {time.perf_counter() - start:.0f} s", file=sys.stderr)  # fmt: skip
    return out_dir


# -------------------------------------------------------------------- the output checkpoint


def checkpoint_tensors(model: CausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's parameters under their HF checkpoint names, fused q/k/v and gate/up split apart."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        parent = module_name.rpartition(".")[0]
        if isinstance(module, Linear) and len(module.shard_sizes) > 1:
            for shard, checkpoint_name in enumerate(model.split_sizes(module)):
                for param_name in params:
                    tensors[f"{parent}.{checkpoint_name}.{param_name}"] = module.shard(param_name, shard)
            continue
        for param_name, param in params.items():
            tensors[f"{module_name}.{param_name}" if module_name else param_name] = param
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # the embedding is saved; transformers ties them again
    return {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}


def output_hf_config(hf_config: dict, config: ModelConfig, pruning: dict) -> dict:
    """The source's config.json with the model's (possibly pruned) shapes, dtype and how it was pruned."""
    out = {
        key: value for key, value in hf_config.items() if key not in ("torch_dtype", "quantization_config")
    }
    out.update(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=str(config.dtype).removeprefix("torch."),
        pruning_config=pruning,
    )
    architecture = (out.get("architectures") or [config.architecture])[0]
    out.setdefault("model_type", MODEL_TYPES.get(architecture))
    if "rope_parameters" not in out and "rope_scaling" not in out:  # transformers 5 reads rope_parameters
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    return out


def save_pruned(source: SourceModel, out_dir: Path, pruning: dict) -> Path:
    """Write config.json, model.safetensors, the tokenizer and generation_config.json to ``out_dir``."""
    model = source.model
    out_dir.mkdir(parents=True, exist_ok=True)
    config = output_hf_config(source.hf_config, model.config, pruning)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp = out_dir / "model.safetensors.tmp"
    save_file(checkpoint_tensors(model, model.config.dtype), str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / "model.safetensors")
    if source.directory is None:
        source.tokenizer.save(out_dir)
        generation = {
            "bos_token_id": source.tokenizer.bos_token_id,
            "eos_token_id": source.tokenizer.eos_token_ids,
        }
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return out_dir
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source.directory / name).is_file():
            shutil.copyfile(source.directory / name, out_dir / name)
    return out_dir


# -------------------------------------------------------------------- command line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M) into a checkpoint directory",
    )
    parser.add_argument(
        "--model", help="HF model directory or GGUF file (default: the built-in default model)"
    )
    parser.add_argument("--out", required=True, help="output model directory (new or empty)")
    parser.add_argument("--method", required=True, choices=list(METHODS),
                        help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))  # fmt: skip
    parser.add_argument("--sparsity", required=True,
                        help="share of each row to prune (0.5), or N:M (2:4 keeps 2 of every 4 inputs)")  # fmt: skip
    parser.add_argument("--calib", help="calibration text file (default: the default model's held-out text)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration row")
    parser.add_argument("--calib-stride", type=int, help="tokens between row starts (default: seq-len, "
                        "or seq-len/4 when the text is too short for --num-samples rows)")  # fmt: skip
    parser.add_argument(
        "--damp", type=float, default=DAMP, help="SparseGPT: Hessian dampening (share of mean diag)"
    )
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="SparseGPT: columns per block")
    parser.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    options = PruneOptions(
        method=args.method,
        pattern=SparsityPattern.parse(args.sparsity),
        calib=args.calib,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        calib_stride=args.calib_stride,
        damp=args.damp,
        block_size=args.block_size,
    )
    out = prune(args.model, args.out, options)
    print(f"wrote {out}", file=sys.stderr)
    return 0
