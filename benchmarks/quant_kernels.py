"""Weight-only int8 / int4 CPU kernels against the bf16 dense path, per TinyLlama layer shape and batch.

Decoding streams every weight from DRAM once per token, so the measurement cycles through
``copies`` different copies of each weight (more bytes than the last-level cache holds) and
reports milliseconds per call. Run: ``python benchmarks/quant_kernels.py [--copies 22]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from effinfer.kernels import dense_linear
from effinfer.kernels.cpu import woq
from effinfer.quant.integer import quantize_rtn

# TinyLlama-1.1B: (name, out_features, in_features)
TINYLLAMA_SHAPES = [
    ("qkv", 2560, 2048),
    ("o_proj", 2048, 2048),
    ("gate_up", 11264, 2048),
    ("down", 2048, 5632),
]
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _time_per_call(fn, states: list, x: torch.Tensor, min_seconds: float) -> float:
    for s in states[:2]:
        fn(s, x)
    calls, start = 0, time.perf_counter()
    while True:
        for s in states:
            fn(s, x)
        calls += len(states)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls * 1e3


def kernel_table(
    shapes: list[tuple[str, int, int]] | None = None,
    batches: tuple[int, ...] = BATCHES,
    copies: int = 22,
    group_size: int = 128,
    min_seconds: float = 0.2,
) -> list[dict]:
    """Rows of {shape, n, k, m, bf16_ms, int8_ms, int4_ms, int8_speedup, int4_speedup}.

    int8 is per output channel, int4 uses ``group_size`` (both symmetric RTN). The quantized
    columns are None where the kernel cannot run on this machine (``woq.extension()`` is None).
    """
    rows = []
    kernel = woq.extension() is not None
    for name, n, k in shapes or TINYLLAMA_SHAPES:
        torch.manual_seed(0)
        weight = torch.randn(n, k) * 0.02
        dense = [dense_linear.prepare(weight.to(torch.bfloat16), None) for _ in range(copies)]
        packed: dict[int, list] = {}
        if kernel:
            for bits, group in ((8, None), (4, group_size)):
                data = woq.pack(quantize_rtn(weight, bits, group), None)
                packed[bits] = [dataclasses.replace(data, codes=data.codes.clone()) for _ in range(copies)]
        for m in batches:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            row = {"shape": name, "n": n, "k": k, "m": m}
            row["bf16_ms"] = _time_per_call(dense_linear.apply, dense, x, min_seconds)
            for bits in (8, 4):
                ms = _time_per_call(woq.apply, packed[bits], x, min_seconds) if kernel else None
                row[f"int{bits}_ms"] = ms
                row[f"int{bits}_speedup"] = row["bf16_ms"] / ms if ms else None
            rows.append(row)
        del dense, packed
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=22)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--shapes", nargs="*", help="subset of: " + " ".join(s[0] for s in TINYLLAMA_SHAPES))
    parser.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    args = parser.parse_args()
    shapes = [s for s in TINYLLAMA_SHAPES if not args.shapes or s[0] in args.shapes]
    print(f"threads={torch.get_num_threads()} copies={args.copies} int8=per-channel int4=g{args.group_size}")
    print(
        f"{'shape':8} {'N x K':>12} {'M':>3} {'bf16 ms':>8} {'int8 ms':>8} {'int4 ms':>8} {'int8 x':>7} {'int4 x':>7}"
    )
    for r in kernel_table(shapes, tuple(args.batches), args.copies, args.group_size):
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(
            f"{r['shape']:8} {r['n']:>5} x {r['k']:<5} {r['m']:>3} {r['bf16_ms']:8.3f} "
            f"{fmt(r['int8_ms'], '8.3f'):>8} {fmt(r['int4_ms'], '8.3f'):>8} "
            f"{fmt(r['int8_speedup'], '7.2f'):>7} {fmt(r['int4_speedup'], '7.2f'):>7}"
        )


if __name__ == "__main__":
    main()
