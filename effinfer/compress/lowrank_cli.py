"""``effinfer compress --low-rank RATIO``: a model in, a low-rank factorized checkpoint directory out.

Papers and idea: see ``compress/lowrank.py`` (truncated SVD, ASVD, SVD-LLM with a global rank
budget). The model is anything effinfer loads (an HF directory, a GGUF file, a quantized
checkpoint), dequantized to float32 first; the output is an HF-layout directory whose factorized
Linears are stored as U and V (``loading/compressed.py``), so ``LLM(OUT)``, ``effinfer generate``,
``effinfer serve`` and ``effinfer eval ppl`` run it.

    effinfer compress --low-rank 0.7 --method svd-llm --model M --out OUT
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from effinfer.compress.calibration import calibration_batches
from effinfer.compress.lowrank import ALLOCATIONS, METHODS, LowRankOptions, LowRankReport, factorize_model
from effinfer.compress.quant.formats import save_quantized
from effinfer.config import ConfigError
from effinfer.default_model import heldout_text_path
from effinfer.loading.checkpoint import open_checkpoint, resolve_model_path
from effinfer.loading.gguf import hf_config_from_gguf
from effinfer.loading.gguf import load_model as load_gguf_model
from effinfer.loading.gguf_tokenizer import save_hf_tokenizer

logger = logging.getLogger(__name__)


def compress_low_rank(
    model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    options: LowRankOptions,
    calib: str | os.PathLike | None = None,
    num_samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[Path, LowRankReport]:
    """Factorize ``model`` (None: the built-in default model) and write it to ``out_dir``."""
    source = resolve_model_path(model)
    out = Path(out_dir)
    _check_out_dir(source, out)
    if num_samples < 1 or seq_len < 2:
        raise ConfigError("--num-samples must be >= 1 and --seq-len >= 2")
    path = Path(calib) if calib else heldout_text_path("calibration")
    if options.needs_calibration and not path.is_file():  # before minutes of loading
        raise ConfigError(f"calibration file {str(path)!r} does not exist")
    start = time.perf_counter()
    checkpoint = open_checkpoint(source)
    config = checkpoint.model_config
    if checkpoint.gguf is None:
        float_model = checkpoint.load_model(torch.float32, torch.device("cpu"), config.max_position_embeddings,
                                            show_progress)  # fmt: skip
    else:
        # Not the inference loader: that releases each quantized block once the kernel packed it, and
        # the spectra and factors need the weights themselves, dequantized.
        float_model = load_gguf_model(checkpoint.gguf, config, torch.float32, torch.device("cpu"),
                                      config.max_position_embeddings, show_progress, finalize=False)  # fmt: skip
    calib_ids = None
    if options.needs_calibration:
        try:
            calib_ids = calibration_batches(checkpoint.tokenizer, path, num_samples, seq_len, seed, "auto")
        except ValueError as e:
            raise ConfigError(f"calibration file {str(path)!r}: {e}") from None
    report = factorize_model(float_model, options, calib_ids, show_progress)
    info = {
        "method": "low-rank",
        "technique": options.method,
        "keep_ratio": options.keep_ratio,
        "allocation": options.allocation,
        **report.as_dict(),
    }
    try:
        if checkpoint.gguf is None:
            save_quantized(float_model, source, source, out, format="effinfer", method_info=info)
        else:
            save_quantized(float_model, hf_config_from_gguf(checkpoint.gguf), None, out, "effinfer", info)
            save_hf_tokenizer(checkpoint.gguf.metadata, out)
    except ValueError as e:  # e.g. every matrix was kept dense
        raise ConfigError(f"cannot write {str(out)!r}: {e}") from None
    logger.info("factorized %s with %s in %.1f s", source, options.method, time.perf_counter() - start)
    return out, report


def _check_out_dir(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve():
        raise ConfigError("--out must differ from --model: the source checkpoint would be overwritten")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is an existing file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty; give a new or empty directory")


# -------------------------------------------------------------------- command line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress", help="factorize a model's Linear layers into low-rank U·V (SVD, ASVD, SVD-LLM)"
    )
    parser.add_argument(
        "--model", help="HF model directory or GGUF file (default: the built-in default model)"
    )
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--low-rank", type=float, required=True, metavar="RATIO",
                        help="share of the decoder Linears' parameters to keep, in (0, 1)")  # fmt: skip
    parser.add_argument("--method", default="svd-llm", choices=list(METHODS),
                        help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))  # fmt: skip
    parser.add_argument("--allocation", default="global", choices=list(ALLOCATIONS),
                        help="; ".join(f"{k}: {v}" for k, v in ALLOCATIONS.items()))  # fmt: skip
    parser.add_argument("--alpha", type=float, default=0.5, help="asvd: exponent of the activation scale")
    parser.add_argument("--calib", help="calibration text file (default: the default model's held-out text)")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row")
    parser.add_argument("--seed", type=int, default=0, help="which calibration rows are drawn")
    parser.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    options = LowRankOptions(args.low_rank, args.method, args.allocation, args.alpha)
    out, report = compress_low_rank(
        args.model, args.out, options, args.calib, args.num_samples, args.seq_len, args.seed
    )
    kept = report.parameters_after / report.parameters_before
    print(
        f"wrote {out}: decoder Linears {report.parameters_before:,} -> {report.parameters_after:,} "
        f"parameters ({kept:.1%})",
        file=sys.stderr,
    )
    return 0
