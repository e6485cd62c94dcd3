"""``effinfer quantize``: a model directory in, a quantized model directory out.

One function drives every method: load the float model (float32, so the quantizer sees the
checkpoint's values), cut calibration rows from a text file when the method needs activations,
transform the decoder's Linear layers, and write the result in a checkpoint layout the
ecosystem reads (GPTQ, AWQ, compressed-tensors or bitsandbytes), so ``LLM(OUT)``, ``effinfer
eval ppl --model OUT`` and ``effinfer serve --model OUT`` run it like any other model.

    effinfer quantize --model IN --method gptq --bits 4 --group-size 128 --out OUT
    effinfer quantize --model IN --method nf4 --double-quant --out OUT         (bitsandbytes 4-bit)
    effinfer quantize --model IN --method llm_int8 --threshold 6.0 --out OUT   (bitsandbytes 8-bit)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from effinfer.compress.calibration import calibration_batches
from effinfer.compress.quant.awq import quantize_model_awq
from effinfer.compress.quant.formats import save_quantized
from effinfer.compress.quant.gptq import quantize_model_gptq
from effinfer.compress.quant.llm_int8 import quantize_model_llm_int8
from effinfer.compress.quant.nf4 import quantize_model_nf4
from effinfer.compress.quant.rtn import quantize_model_rtn
from effinfer.compress.quant.smoothquant import quantize_model_naive_w8a8, quantize_model_smoothquant
from effinfer.config import ConfigError, ModelConfig
from effinfer.default_model import default_model_path, heldout_text_path
from effinfer.loading.safetensors import check_model_dir, load_model
from effinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# bitsandbytes' 4-bit block size (absmax constants per 64 weights), the default for nf4 / fp4.
BNB_4BIT_BLOCKSIZE = 64


@dataclass
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int | None = 128  # None: one group per output row (per channel)
    symmetric: bool | None = None  # None: the method's usual choice
    calib: str | os.PathLike | None = None  # text file; None: the default model's held-out calibration text
    num_samples: int = 128
    seq_len: int = 512
    # Tokens between calibration row starts. None: non-overlapping rows, or, when the text is too
    # short for ``num_samples`` of them, rows every seq_len // 4 tokens (GPTQ samples random windows).
    calib_stride: int | None = None
    act_order: bool = True  # GPTQ: quantize columns in order of decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ
    alpha: float = 0.5  # SmoothQuant migration strength
    awq_clip: bool = True  # AWQ clipping search
    threshold: float = 6.0  # LLM.int8(): |activation| above which a column runs in floating point
    double_quant: bool = False  # NF4 / FP4: quantize the absmax constants too (8-bit, blocks of 256)
    format: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown quantization method {self.method!r}; choose from {', '.join(METHODS)}"
            )
        if self.method in ("smoothquant", "w8a8-naive"):
            if self.bits != 8:
                raise ConfigError(f"{self.method} is W8A8: --bits must be 8, got {self.bits}")
            self.group_size = None
        if self.method == "llm_int8":
            if self.bits not in (4, 8):  # 4 is the CLI's default --bits; LLM.int8() is 8-bit only
                raise ConfigError(f"llm_int8 is 8-bit: --bits must be 8, got {self.bits}")
            self.bits, self.group_size, self.symmetric = 8, None, True
            if not self.threshold >= 0:
                raise ConfigError(f"--threshold must be >= 0 (inf: no float columns), got {self.threshold}")
        if self.method in ("nf4", "fp4"):
            if self.bits != 4:
                raise ConfigError(f"{self.method} is a 4-bit format: --bits must be 4, got {self.bits}")
            if self.group_size is None or self.group_size <= 0:  # blocks, never whole rows
                self.group_size = BNB_4BIT_BLOCKSIZE
            self.symmetric = True  # absmax scaling, no zero point
        elif self.double_quant:
            raise ConfigError("--double-quant applies to --method nf4 / fp4 only")
        if self.bits not in (4, 8):
            raise ConfigError(f"--bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            self.group_size = None
        if self.method == "awq" and self.bits != 4:
            raise ConfigError("AWQ here quantizes to 4 bits (its GEMM checkpoint layout is 4-bit only)")
        if self.symmetric is None:
            # int8 is accurate enough symmetric; int4 gains from a zero point (AWQ's format needs one).
            self.symmetric = self.bits == 8 and self.method != "awq"
        layouts = METHODS[self.method].formats
        if self.format is None:
            self.format = layouts[0]
        elif self.format not in layouts:
            raise ConfigError(
                f"--method {self.method} writes {' or '.join(layouts)}, not --format {self.format}"
            )
        if self.method != "gptq":
            self.act_order = False
        if self.num_samples < 1 or self.seq_len < 2:
            raise ConfigError("--num-samples must be >= 1 and --seq-len >= 2")


@dataclass(frozen=True)
class Method:
    """One offline quantization method: how it transforms a model and the checkpoint layouts it can write."""

    name: str
    run: Callable[
        [torch.nn.Module, QuantizeOptions, torch.Tensor | None, bool], None
    ]  # model, options, calib, progress
    formats: tuple[str, ...]  # layouts that can store its weights; the first unless --format says otherwise
    needs_calibration: bool
    description: str


_INTEGER_LAYOUTS = ("gptq", "awq", "compressed-tensors")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", lambda model, o, calib, progress: quantize_model_rtn(
        model, o.bits, o.group_size, o.symmetric, show_progress=progress), _INTEGER_LAYOUTS, False, "round to nearest"),
    Method("gptq", lambda model, o, calib, progress: quantize_model_gptq(
        model, calib, o.bits, o.group_size, symmetric=o.symmetric, act_order=o.act_order, damp=o.damp,
        show_progress=progress), _INTEGER_LAYOUTS, True, "GPTQ (Hessian-aware rounding)"),
    Method("awq", lambda model, o, calib, progress: quantize_model_awq(
        model, calib, o.bits, o.group_size, symmetric=o.symmetric, clip=o.awq_clip, show_progress=progress),
        ("awq", "gptq", "compressed-tensors"), True, "AWQ (activation-aware scaling), 4-bit"),
    Method("smoothquant", lambda model, o, calib, progress: quantize_model_smoothquant(
        model, calib, alpha=o.alpha, show_progress=progress), ("compressed-tensors",), True, "SmoothQuant W8A8"),
    Method("w8a8-naive", lambda model, o, calib, progress: quantize_model_naive_w8a8(model),
           ("compressed-tensors",), False, "W8A8 without smoothing (per tensor)"),
    Method("llm_int8", lambda model, o, calib, progress: quantize_model_llm_int8(model, threshold=o.threshold),
           ("bitsandbytes",), False, "LLM.int8() with float outlier columns"),
    Method("nf4", lambda model, o, calib, progress: quantize_model_nf4(
        model, quant_type="nf4", blocksize=o.group_size, double_quant=o.double_quant),
        ("bitsandbytes",), False, "bitsandbytes NF4"),
    Method("fp4", lambda model, o, calib, progress: quantize_model_nf4(
        model, quant_type="fp4", blocksize=o.group_size, double_quant=o.double_quant),
        ("bitsandbytes",), False, "bitsandbytes FP4"),
)}  # fmt: skip


def load_float_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """The model with plain float weights and its config: what a compression pass works on."""
    model_dir = check_model_dir(model_dir)
    config = ModelConfig.from_dir(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"{model_dir} is already quantized ({method}); quantize the float model instead")
    model = load_model(model_dir, config, dtype, torch.device("cpu"), config.max_position_embeddings,
                       show_progress=True, finalize=False)  # fmt: skip
    return model, config


def calibration_ids(model_dir: Path, options: QuantizeOptions) -> torch.Tensor:
    path = Path(options.calib) if options.calib else heldout_text_path("calibration")
    if not path.is_file():
        raise ConfigError(f"calibration file {str(path)!r} does not exist")
    tokenizer = Tokenizer.from_dir(model_dir)
    stride = options.calib_stride or "auto"
    try:
        rows = calibration_batches(
            tokenizer, path, options.num_samples, options.seq_len, options.seed, stride
        )
    except ValueError as e:  # the text is too short for the rows asked for
        raise ConfigError(f"calibration file {str(path)!r}: {e}") from None
    logger.info("calibration: %d rows of %d tokens from %s", len(rows), rows.shape[1], path)
    return rows


def apply_method(model, options: QuantizeOptions, calib: torch.Tensor | None, show_progress: bool = True):
    """Transform ``model``'s decoder Linears in place with the chosen method."""
    METHODS[options.method].run(model, options, calib, show_progress)


def quantize(
    model_dir: str | os.PathLike | None, out_dir: str | os.PathLike, options: QuantizeOptions,
    show_progress: bool = True,
) -> Path:  # fmt: skip
    """Quantize the model in ``model_dir`` (None: the built-in default model) and write it to ``out_dir``."""
    model_dir = Path(model_dir) if model_dir else default_model_path()
    out_dir = Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError("--out must differ from --model: the float checkpoint would be overwritten")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is an existing file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(
            f"--out {str(out_dir)!r} is not empty; give a new or empty directory (nothing is overwritten)"
        )
    start = time.perf_counter()
    model, _ = load_float_model(model_dir)
    calib = calibration_ids(model_dir, options) if METHODS[options.method].needs_calibration else None
    with torch.no_grad():
        apply_method(model, options, calib, show_progress)
    info = {
        "method": options.method,
        "bits": options.bits,
        "group_size": options.group_size,
        "symmetric": options.symmetric,
        "act_order": options.act_order,
    }
    if options.method == "llm_int8":
        info["threshold"] = options.threshold
    if options.method in ("nf4", "fp4"):
        info["double_quant"] = options.double_quant
    save_quantized(model, model_dir, model_dir, out_dir, format=options.format, method_info=info)
    logger.info("quantized %s with %s in %.1f s", model_dir, options.method, time.perf_counter() - start)
    return out_dir


# -------------------------------------------------------------------- command line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a model (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), NF4/FP4) into a checkpoint directory",
    )
    parser.add_argument("--model", help="HF model directory (default: the built-in default model)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--method", required=True, choices=list(METHODS),
                        help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))  # fmt: skip
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument(
        "--group-size", type=int, default=None,
        help="input columns per scale (default 128 for 4-bit, per channel for 8-bit, 64 for nf4/fp4; "
             "-1: per channel)",
    )  # fmt: skip
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None, help="no zero point")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="with a zero point")
    parser.add_argument("--calib", help="calibration text file (default: the default model's held-out text)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration row")
    parser.add_argument("--calib-stride", type=int, help="tokens between row starts (default: seq-len, "
                        "or seq-len/4 when the text is too short for --num-samples rows)")  # fmt: skip
    parser.add_argument("--no-act-order", dest="act_order", action="store_false",
                        help="GPTQ: quantize columns left to right instead of by decreasing Hessian diagonal")  # fmt: skip
    parser.add_argument(
        "--damp", type=float, default=0.01, help="GPTQ: Hessian dampening (share of mean diag)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    parser.add_argument("--no-awq-clip", action="store_true", help="AWQ: skip the clipping search")
    parser.add_argument("--threshold", type=float, default=6.0,
                        help="llm_int8: activation magnitude above which an input column runs in "
                             "floating point instead of int8 (inf: never)")  # fmt: skip
    parser.add_argument("--double-quant", action="store_true",
                        help="nf4/fp4: quantize the absmax constants to 8 bits as well (QLoRA)")  # fmt: skip
    parser.add_argument("--format", choices=("gptq", "awq", "compressed-tensors", "bitsandbytes"),
                        help="checkpoint layout (default: gptq for rtn/gptq, awq for awq, "
                             "compressed-tensors for W8A8, bitsandbytes for llm_int8/nf4/fp4)")  # fmt: skip
    parser.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    group_size = args.group_size
    if group_size is None:
        if args.method in ("nf4", "fp4"):
            group_size = BNB_4BIT_BLOCKSIZE
        else:
            group_size = 128 if args.bits == 4 else -1
    options = QuantizeOptions(
        method=args.method,
        bits=args.bits,
        group_size=group_size,
        symmetric=args.symmetric,
        calib=args.calib,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        calib_stride=args.calib_stride,
        act_order=args.act_order,
        damp=args.damp,
        alpha=args.alpha,
        awq_clip=not args.no_awq_clip,
        threshold=args.threshold,
        double_quant=args.double_quant,
        format=args.format,
    )
    out = quantize(args.model, args.out, options)
    print(f"wrote {out}", file=sys.stderr)
    return 0
