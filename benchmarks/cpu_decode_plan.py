"""What the CPU decode plan buys: batch-1 decode with the plan vs through the modules, one process.

Loads a model once and decodes ``--tokens`` greedy tokens per round, alternating, round by round,
between the plan (``models/cpu_decode_plan.py``) and the modules (the plan taken off the runner),
keeping each one's best and median round, so the ratio holds on a noisy machine. Run:
``python benchmarks/cpu_decode_plan.py MODEL [MODEL ...] [--rounds 8] [--tokens 64] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError


def ms_per_token(engine, tokens: int) -> float:
    engine.add_request(
        list(range(10, 26)), SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    )
    engine.step()  # prefill, not counted
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - start) / tokens * 1e3


def compare(model: str, args: argparse.Namespace) -> None:
    llm = LLM(model, dtype="bfloat16", num_threads=args.threads, max_num_seqs=1, max_model_len=512,
              enable_prefix_caching=False, kv_cache_memory=64 << 20, show_progress=False)  # fmt: skip
    runner = llm.engine.runner
    ms_per_token(llm.engine, args.tokens)  # warm-up; makes the plan
    plan = runner.decode_plan
    if plan is None:
        print(f"{model}: no decode plan for this model here")
        return
    times: dict[str, list[float]] = {"plan": [], "modules": []}
    for _ in range(args.rounds):
        for name in times:
            runner.decode_plan = plan if name == "plan" else None
            times[name].append(ms_per_token(llm.engine, args.tokens))
    runner.decode_plan = plan
    best = {name: min(v) for name, v in times.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    print(f"| {model.rsplit('/', 1)[-1]} | {best['modules']:.2f} | {best['plan']:.2f} | "
          f"{best['modules'] / best['plan']:.3f}x | {median['modules']:.2f} | {median['plan']:.2f} | "
          f"{median['modules'] / median['plan']:.3f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit(f"error: --rounds must be >= 1, got {args.rounds}")
    if args.tokens < 1:
        sys.exit(f"error: --tokens must be >= 1, got {args.tokens}")
    if args.threads < 1:
        sys.exit(f"error: --threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    print(
        f"batch-1 decode, {args.tokens} tokens x {args.rounds} rounds, {args.threads} threads, ms per token"
    )
    print("| model | modules best | plan best | speed-up | modules median | plan median | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    try:
        for model in args.models:
            compare(model, args)
    except ConfigError as error:  # a missing or unreadable model: one line, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
