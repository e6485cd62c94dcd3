"""Prefill attention on CPU: SDPA with ``enable_gqa`` against KV heads repeated up to the query heads.

``layers/attention.py`` repeats the KV heads before calling SDPA because, given fewer KV heads
than query heads (``enable_gqa=True``), PyTorch's CPU SDPA takes its unfused math path, while
equal head counts get the flash kernel. This times both ways for one causal prompt with
TinyLlama-1.1B's heads (32 query heads, 4 KV heads, head size 64, bf16); the repeat is inside
the timed call. The two take turns, round by round, and each keeps its best round, so the ratio
holds even on a busy machine. Run:
``python benchmarks/prefill_attention.py [--lengths 64 256 1024] [--rounds 5] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def with_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def repeated_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


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
    print("| prompt tokens | enable_gqa ms | repeated KV ms | enable_gqa / repeated |")
    print("|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for length in args.lengths:
        # As the engine lays them out: [1, T, heads, d] projections seen as [1, heads, T, d].
        q = torch.randn(1, length, args.heads, args.head_size, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, length, args.kv_heads, args.head_size, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, length, args.kv_heads, args.head_size, dtype=torch.bfloat16).transpose(1, 2)
        torch.testing.assert_close(with_gqa(q, k, v), repeated_kv(q, k, v), rtol=2e-2, atol=2e-2)
        best = {with_gqa: float("inf"), repeated_kv: float("inf")}
        for _ in range(args.rounds):
            for fn in best:
                best[fn] = min(best[fn], ms_per_call(fn, (q, k, v), args.min_seconds))
        gqa, repeated = best[with_gqa], best[repeated_kv]
        print(f"| {length} | {gqa:.3f} | {repeated:.3f} | {gqa / repeated:.2f}x |")


if __name__ == "__main__":
    main()
