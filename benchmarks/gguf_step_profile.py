"""Where a batch-1 decode step's time goes on a GGUF file: the matrix products vs the rest.

Every ``Linear`` of the loaded model is wrapped with a timer (the kernel call and its Python
wrapper), ``--tokens`` greedy decode steps run after a short prompt, and the table gives, per
token, the whole engine step, the time inside each kind of linear (q/k/v, o, gate/up, down,
lm_head), their weight bytes and the bandwidth they reach, and the rest (attention, norms,
rotary, sampling, scheduling, Python). The best of ``--repeats`` runs is kept.

Run: ``python benchmarks/gguf_step_profile.py FILE.gguf [--threads 2] [--tokens 64]``
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.files:
        profile(path, args)


if __name__ == "__main__":
    main()
