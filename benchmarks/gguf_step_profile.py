"""Where a batch-1 decode step's (or a prompt's prefill) time goes on a GGUF file: the matrix products vs the rest.

Every ``Linear`` of the loaded model is wrapped with a timer (the kernel call and its Python
wrapper), ``--tokens`` greedy decode steps run after a short prompt, and the table gives, per
token, the whole engine step, the time inside each kind of linear (q/k/v, o, gate/up, down,
lm_head), their weight bytes and the bandwidth they reach, and the rest (attention, norms,
rotary, sampling, scheduling, Python). The best of ``--repeats`` runs is kept. With
``--prefill N`` the same table is made for the prefill of one N-token prompt instead (per
prompt, bandwidth left out: a prefill is compute-bound); run it with ``EFFINFER_CPU_FLASH=0`` to
see the prompt attention on PyTorch's SDPA.

Run: ``python benchmarks/gguf_step_profile.py FILE.gguf [--threads 2] [--tokens 64] [--prefill 512]``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError
from effinfer.layers.linear import Linear


def linear_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def instrument(model: torch.nn.Module, seconds: dict[str, float]) -> dict[str, int]:
    """Wrap every Linear's forward with a timer; returns the weight bytes per kind."""
    nbytes: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        kind = linear_kind(name)
        nbytes[kind] += module.weight_nbytes()
        forward = module.forward

        def timed(x, forward=forward, kind=kind):
            start = time.perf_counter()
            y = forward(x)
            seconds[kind] += time.perf_counter() - start
            return y

        module.forward = timed
    return nbytes


def profile_prefill(path: Path, args: argparse.Namespace) -> None:
    llm = LLM(str(path), dtype="bfloat16", num_threads=args.threads, max_num_seqs=1,
              max_model_len=max(1024, args.prefill + 16), max_num_batched_tokens=max(2048, args.prefill),
              enable_prefix_caching=False, kv_cache_memory=256 << 20, show_progress=False)  # fmt: skip
    engine = llm.engine
    seconds: dict[str, float] = defaultdict(float)
    instrument(engine.model, seconds)
    prompt = [10 + i % 1000 for i in range(args.prefill)]
    best = None
    for repeat in range(args.repeats + 1):  # the first run warms up
        seconds.clear()
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        total = time.perf_counter() - start
        if repeat and (best is None or total < best[0]):
            best = (total, dict(seconds))
    total, parts = best
    matmul = sum(parts.values())
    print(f"{path.name}: prefill of {args.prefill} tokens {total * 1e3:.1f} ms ({args.prefill / total:.0f} tok/s), "
          f"{args.threads} threads")  # fmt: skip
    print("| part | ms / prompt | share |")
    print("|---|---:|---:|")
    for kind, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t * 1e3:.1f} | {t / total:.0%} |")
    print(f"| all linears | {matmul * 1e3:.1f} | {matmul / total:.0%} |")
    print(f"| the rest | {(total - matmul) * 1e3:.1f} | {(total - matmul) / total:.0%} |")


def profile(path: Path, args: argparse.Namespace) -> None:
    llm = LLM(str(path), dtype="bfloat16", num_threads=args.threads, max_num_seqs=1, max_model_len=1024,
              enable_prefix_caching=False, kv_cache_memory=64 << 20, show_progress=False)  # fmt: skip
    engine = llm.engine
    seconds: dict[str, float] = defaultdict(float)
    nbytes = instrument(engine.model, seconds)
    best = None
    for _ in range(args.repeats):
        engine.add_request(
            list(range(10, 26)), SamplingParams(temperature=0, max_tokens=args.tokens + 1, ignore_eos=True)
        )
        engine.step()  # prefill, not counted
        seconds.clear()
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        total = (time.perf_counter() - start) / steps
        per_token = {k: v / steps for k, v in seconds.items()}
        if best is None or total < best[0]:
            best = (total, per_token)
    total, per_token = best
    matmul = sum(per_token.values())
    print(f"{path.name}: {1 / total:.1f} tok/s, {total * 1e3:.2f} ms per token, {args.threads} threads")
    print("| part | ms / token | share | weight MiB | GB/s |")
    print("|---|---:|---:|---:|---:|")
    for kind, t in sorted(per_token.items(), key=lambda kv: -kv[1]):
        mib = nbytes[kind] / 2**20
        print(f"| {kind} | {t * 1e3:.2f} | {t / total:.0%} | {mib:.1f} | {nbytes[kind] / t / 1e9:.1f} |")
    weights = sum(nbytes.values())
    print(f"| all linears | {matmul * 1e3:.2f} | {matmul / total:.0%} | {weights / 2**20:.1f} "
          f"| {weights / matmul / 1e9:.1f} |")  # fmt: skip
    print(f"| the rest | {(total - matmul) * 1e3:.2f} | {(total - matmul) / total:.0%} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prefill", type=int, default=0, help="profile one prompt of this many tokens instead"
    )
    args = parser.parse_args()
    if args.threads < 1:
        sys.exit(f"error: --threads must be >= 1, got {args.threads}")
    if args.tokens < 1:
        sys.exit(f"error: --tokens must be >= 1, got {args.tokens}")
    if args.repeats < 1:
        sys.exit(f"error: --repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    if args.prefill < 0:
        sys.exit(f"error: --prefill must be >= 0, got {args.prefill}")
    try:
        for path in args.files:
            (profile_prefill if args.prefill else profile)(path, args)
    except ConfigError as error:  # a missing or unreadable model: one line, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
