"""``effinfer bench``: measured speed, always next to a peer measured in the same run.

    effinfer bench --model DIR [--dtype bfloat16] [--device cpu] [--compare hf]
                   [--batch-decode-tokens 64] [--num-requests 16] [--input-len-range 32:128]
                   [--output-len-range 16:64] [--concurrent 16] [--seed 0]
                   [--markdown FILE] [--json FILE] [--plot FILE.png]
    effinfer bench make-model --preset tinyllama-1.1b --out DIR
    effinfer bench quant --model DIR ...      (``quant.py``)
    effinfer bench serve --url URL ...        (``serve.py``)
    effinfer bench gguf --model FILE.gguf ... (``gguf.py``: the race against llama.cpp's tools)

The first form runs the suite in ``suite.py`` (batch-1 decode with weight bandwidth, offline
throughput, C concurrent requests) and prints a table; ``--compare hf`` runs the same workloads
through transformers and adds effinfer/HF ratios. The second writes a random-weight model of a
known shape (``models.py``) to benchmark without downloading one. ``quant`` and ``serve`` are
their own actions, each registered by its module. ``effinfer.cli`` calls ``register``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from effinfer.bench import gguf, quant, report, serve
from effinfer.bench.models import PRESETS, make_random_model
from effinfer.bench.serve import BenchServeError
from effinfer.bench.suite import BenchError, BenchSettings, run_suite
from effinfer.bench.workload import parse_range
from effinfer.config import ConfigError

__all__ = ["register", "add_arguments", "run", "main", "make_random_model", "BenchError", "BenchServeError"]

DESCRIPTION = (
    "Measure batch-1 decode, offline throughput and concurrent throughput, "
    "optionally against transformers on the same workloads."
)


def _length_range(text: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bench`` options, and the ``make-model`` action, to ``parser``."""
    parser.add_argument(
        "--model", metavar="DIR", help="HF model directory (config.json + *.safetensors) to benchmark"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32; both engines"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda; both engines")
    parser.add_argument(
        "--compare", choices=["hf"], default=None, help="also run the same workloads with transformers"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="free effinfer before loading the peer (for models too big to hold twice); "
        "by default both are loaded and take turns scenario by scenario",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        default=None,
        help="CPU threads for both engines (default: usable cores)",
    )
    group = parser.add_argument_group("scenarios")
    group.add_argument(
        "--batch-decode-tokens",
        type=int,
        metavar="N",
        default=64,
        help="tokens timed in the batch-1 decode (default 64)",
    )
    group.add_argument(
        "--decode-input-len",
        type=int,
        metavar="N",
        default=32,
        help="prompt length for the batch-1 decode (default 32)",
    )
    group.add_argument(
        "--num-requests",
        type=int,
        metavar="N",
        default=16,
        help="requests in the offline throughput run (default 16)",
    )
    group.add_argument(
        "--input-len-range",
        type=_length_range,
        default=(32, 128),
        metavar="LOW:HIGH",
        help="offline prompt lengths, uniform, inclusive (default 32:128)",
    )
    group.add_argument(
        "--output-len-range",
        type=_length_range,
        default=(16, 64),
        metavar="LOW:HIGH",
        help="offline output lengths, uniform, inclusive (default 16:64)",
    )
    group.add_argument(
        "--concurrent",
        type=int,
        metavar="N",
        default=16,
        help="requests in the concurrent run, all of one prompt and one output length; 0 skips it (default 16)",
    )
    group.add_argument("--concurrent-input-len", type=int, metavar="N", default=64, help="(default 64)")
    group.add_argument("--concurrent-output-len", type=int, metavar="N", default=32, help="(default 32)")
    group.add_argument(
        "--seed", type=int, metavar="N", default=0, help="seed of the random prompts and lengths"
    )
    group.add_argument("--speculative-model", help='effinfer only: a draft model or "ngram" (see docs)')
    group.add_argument("--num-speculative-tokens", type=int, metavar="K", help="draft tokens per step")
    group.add_argument(
        "--tensor-parallel-size", type=int, metavar="N", default=1, help="effinfer only: ranks per layer"
    )
    group.add_argument(
        "--pipeline-parallel-size", type=int, metavar="M", default=1, help="effinfer only: pipeline stages"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--markdown", metavar="FILE", help="append a section with the results to FILE")
    out.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    out.add_argument("--plot", metavar="FILE.png", help="bar chart of tokens/s (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars or stage messages")

    actions = parser.add_subparsers(dest="bench_action", metavar="{make-model,quant,serve,gguf}")
    make = actions.add_parser(
        "make-model",
        help="write a random-weight HF Llama model of a known shape",
        description="Write a random-init HF LlamaForCausalLM directory (config, safetensors, tokenizer).",
    )
    make.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    make.add_argument("--out", required=True, help="directory to write (created if missing)")
    make.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    make.add_argument("--seed", type=int, metavar="N", default=0)
    make.set_defaults(func=_make_model)
    quant.register(actions)
    serve.register(actions)
    gguf.register(actions)
    parser.set_defaults(func=run)


def register(subparsers) -> None:
    """Adds ``bench`` (and its actions) to the ``effinfer`` subcommands."""
    parser = subparsers.add_parser(
        "bench",
        help="decode speed and throughput, optionally against HF transformers",
        description=DESCRIPTION,
    )
    add_arguments(parser)


def build_parser(prog: str = "effinfer bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``effinfer bench ARGV...`` on its own (the ``effinfer`` command goes through ``effinfer.cli``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["effinfer", "bench", *argv])
    try:
        return args.func(args)
    except (BenchError, BenchServeError, ConfigError) as e:
        print(f"effinfer bench: error: {e}", file=sys.stderr)
        return 2


def _make_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effinfer.bench.suite import BenchError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {str(out)!r} is an existing file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise BenchError(
            f"--out {str(out)!r} is not empty; give a new or empty directory (nothing is overwritten)"
        )
    path = make_random_model(args.out, preset=args.preset, dtype=args.dtype, seed=args.seed)
    print(f"wrote a random-weight {args.preset} model ({args.dtype}) to {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs the suite for a parsed ``bench`` command line; raises BenchError or ConfigError."""
    if not args.model:
        raise BenchError("--model is required (or use `effinfer bench make-model` to create one)")
    if args.compare == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise BenchError("--compare hf needs transformers: pip install transformers") from None
    settings = BenchSettings(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        compare=args.compare,
        threads=args.threads,
        batch_decode_tokens=args.batch_decode_tokens,
        decode_input_len=args.decode_input_len,
        num_requests=args.num_requests,
        input_len_range=args.input_len_range,
        output_len_range=args.output_len_range,
        concurrent=args.concurrent,
        concurrent_input_len=args.concurrent_input_len,
        concurrent_output_len=args.concurrent_output_len,
        seed=args.seed,
        sequential=args.sequential,
        show_progress=not args.no_progress,
        speculative_model=args.speculative_model,
        num_speculative_tokens=args.num_speculative_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )
    command = getattr(args, "command_line", None) or shlex.join(["effinfer", *sys.argv[1:]])
    result = run_suite(settings, command)
    print(report.render_text(result), flush=True)
    if "spec_acceptance_rate" in result.model:
        print(
            f"speculative decoding ({settings.speculative_model}): acceptance rate "
            f"{result.model['spec_acceptance_rate']:.3f}, mean accepted length "
            f"{result.model['spec_mean_accepted_length']:.2f}"
        )
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        report.append_markdown(result, args.markdown)
        print(f"appended a section to {args.markdown}")
    if args.plot and report.write_plot(result, args.plot):
        print(f"wrote {args.plot}")
    return 0
