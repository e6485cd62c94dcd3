"""Prefill attention on CPU: effinfer's AMX flash kernel against PyTorch's SDPA, two ways.

Three ways to attend one causal prompt (bf16, the projections laid out as the engine has them):
  * flash        kernels/cpu/flash_prefill.py (what ``layers/attention.py`` runs where it can)
  * repeated KV  KV heads repeated up to the query heads, then SDPA (its flash kernel; the
                 fallback path, e.g. without AMX)
  * enable_gqa   SDPA with fewer KV heads than query heads, which PyTorch's CPU SDPA runs on its
                 unfused math path
Each takes its turn, round by round, and keeps its best round, so the ratios hold even on a busy
machine. Defaults: TinyLlama-1.1B's heads (32 query, 4 KV, head size 64). Run:
``python benchmarks/prefill_attention.py [--lengths 64 256 1024] [--heads 32 --kv-heads 4 --head-size 64]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from effinfer.kernels.cpu import flash_prefill


def with_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def repeated_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    tokens = q.shape[2]
    rows = (x.transpose(1, 2).reshape(tokens, -1) for x in (q, k, v))  # views: [T, heads * d]
    out = flash_prefill.causal_attention(*rows, q.shape[1], k.shape[1], q.shape[-1] ** -0.5)
    return out.view(1, tokens, q.shape[1], -1).transpose(1, 2)


def ms_per_call(fn, args: tuple, min_seconds: float) -> float:
    fn(*args)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls < 3:
        fn(*args)
        calls += 1
    return elapsed / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.2, help="time per measurement")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, "
        f"{args.heads} query heads, {args.kv_heads} KV heads, head size {args.head_size}"
    )
    contenders = {"enable_gqa": with_gqa, "repeated KV": repeated_kv}
    if flash_prefill.extension() is not None:
        contenders["flash"] = flash
    names = list(contenders)
    print("| prompt tokens | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(
        f"{n} / {names[-1]}" for n in names[:-1]) + " |")  # fmt: skip
    print("|---:|" + "---:|" * (2 * len(names) - 1))
    torch.manual_seed(0)
    for length in args.lengths:
        # As the engine lays them out: [1, T, heads, d] projections seen as [1, heads, T, d].
        q = torch.randn(1, length, args.heads, args.head_size, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, length, args.kv_heads, args.head_size, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, length, args.kv_heads, args.head_size, dtype=torch.bfloat16).transpose(1, 2)
        for fn in contenders.values():
            torch.testing.assert_close(fn(q, k, v), repeated_kv(q, k, v), rtol=3e-2, atol=3e-2)
        best = dict.fromkeys(names, float("inf"))
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    best[name] = min(best[name], ms_per_call(fn, (q, k, v), args.min_seconds))
        times = " | ".join(f"{best[n]:.3f}" for n in names)
        ratios = " | ".join(f"{best[n] / best[names[-1]]:.2f}x" for n in names[:-1])
        print(f"| {length} | {times} | {ratios} |")


if __name__ == "__main__":
    main()
