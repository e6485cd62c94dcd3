"""``effinfer report``: what each technique buys on this model, on this machine, in one command.

effinfer report --model M [--data TEXT] --out DIR [--budget-minutes N] [--techniques a,b,...]
effinfer report --compare A.json B.json [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from effinfer.config import EngineConfig, parse_bytes
from effinfer.default_model import default_model_path, heldout_text_path
from effinfer.report.measure import MeasureSettings
from effinfer.report.render import compare_html, compare_markdown, write_report
from effinfer.report.run import run_report
from effinfer.report.techniques import TECHNIQUES, ReportError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="HF model directory or .gguf file (default: the built-in default model)"
    )
    parser.add_argument(
        "--data", help="UTF-8 text for perplexity (default: the default model's held-out text)"
    )
    parser.add_argument("--out", help="directory for index.html, report.json, report.md and the charts")
    parser.add_argument("--budget-minutes", type=float, help="stop starting techniques that would not fit")
    parser.add_argument("--techniques", help=f"comma-separated, default all: {', '.join(TECHNIQUES)}")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the engine's)")
    parser.add_argument("--dtype", default="auto", help="activation dtype (default: the model's)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens timed in batch-1 decode")
    parser.add_argument("--num-requests", type=int, default=16, help="requests in the batched run")
    parser.add_argument("--ppl-ctx", type=int, default=512, help="perplexity window in tokens")
    parser.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows scored at most")
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=256 << 20, help="KV budget per engine")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="two runs side by side")


def register(subparsers) -> None:
    """Adds ``report`` to the ``effinfer`` subcommands."""
    parser = subparsers.add_parser("report", help="what each technique buys on a model: one HTML page",
                                   description=__doc__.splitlines()[0].replace("``", ""))  # fmt: skip
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def _positive(args: argparse.Namespace) -> None:
    for flag in ("decode_tokens", "num_requests", "ppl_ctx", "ppl_windows", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ReportError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise ReportError(f"--budget-minutes must be positive, got {args.budget_minutes:g}")


def run_command(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args)
    if not args.out:
        raise ReportError("--out DIR is required (where index.html and report.json go)")
    _positive(args)
    names = [n.strip() for n in args.techniques.split(",") if n.strip()] if args.techniques else None
    if names is not None and not names:
        raise ReportError("--techniques names no technique")
    settings = MeasureSettings(
        data=Path(args.data) if args.data else heldout_text_path("evaluation"),
        decode_tokens=args.decode_tokens, num_requests=args.num_requests, ppl_ctx=args.ppl_ctx,
        ppl_windows=args.ppl_windows, kv_cache_memory=args.kv_cache_memory, dtype=args.dtype,
        threads=args.threads, seed=args.seed,
    )  # fmt: skip
    command = getattr(args, "command_line", None) or shlex.join(["effinfer", *sys.argv[1:]])
    budget = None if args.budget_minutes is None else args.budget_minutes * 60
    device = EngineConfig(device=args.device).device  # checked, and "auto" resolved
    report = run_report(args.model or default_model_path(), settings, names, budget, device, command,
                        show_progress=not args.no_progress)  # fmt: skip
    files = write_report(report.to_dict(), Path(args.out))
    print(Path(files[1]).read_text())
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _load_run(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("effinfer-report/"):
        raise ReportError(f"{path} is not an effinfer report.json")
    return data


def _compare(args: argparse.Namespace) -> int:
    a, b = (_load_run(p) for p in args.compare)
    names = ("A", "B")
    text = compare_markdown(a, b, names)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
        (out / "index.html").write_text(compare_html(text, "effinfer report: A vs B"))
        print(f"wrote {out / 'compare.md'}, {out / 'index.html'}", file=sys.stderr)
    return 0
