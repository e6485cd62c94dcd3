"""How fast this machine streams memory, with and without software prefetch: why the skinny GEMM prefetches.

A decode step is a read of every weight, so the read rate of a plain loop bounds it. The loop
below sums a 2 GiB buffer (2 MiB pages, like the engine's weights) with AVX-512 loads on every
thread, each thread over its own contiguous half, once as is and once with each 64-byte line
prefetched ``distance`` bytes ahead. Prints GB/s per setting. Run:
``python benchmarks/memory_stream.py [--gib 2] [--distances 256 768 4096]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils import cpp_extension

import effinfer  # noqa: F401  (2 MiB pages for the buffer, as for the engine's weights)

SOURCE = r"""
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

// Sum of a float32 buffer, each thread over a contiguous share, prefetching ``distance`` bytes ahead (0: none).
double stream_sum(torch::Tensor buffer, int64_t distance) {
  const char* base = (const char*)buffer.data_ptr();
  const int64_t bytes = buffer.nbytes() / 256 * 256;
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(threads * 8, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = bytes / threads * t / 256 * 256, hi = t + 1 == threads ? bytes : bytes / threads * (t + 1) / 256 * 256;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = lo; i < hi; i += 256) {
        if (distance)
          for (int64_t line = 0; line < 256; line += 64) _mm_prefetch(base + i + line + distance, _MM_HINT_T0);
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps((const float*)(base + i)));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps((const float*)(base + i + 64)));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps((const float*)(base + i + 128)));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps((const float*)(base + i + 192)));
      }
      partial[t * 8] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
  });
  double total = 0;
  for (int64_t t = 0; t < threads; ++t) total += partial[t * 8];
  return total;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="buffer size (default 2 GiB)")
    parser.add_argument(
        "--distances", type=int, nargs="*", default=[256, 768, 4096], help="prefetch distances in bytes"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    module = cpp_extension.load_inline(
        name="effinfer_memory_stream",
        cpp_sources=SOURCE,
        functions=["stream_sum"],
        extra_cflags=["-O3", "-fopenmp", "-mavx512f"],
        extra_ldflags=["-fopenmp"],
    )
    buffer = torch.ones(int(args.gib * 2**30) // 4)
    print(f"threads={torch.get_num_threads()} buffer={args.gib} GiB")
    print("| prefetch distance | GB/s |\n|---|---:|")
    for distance in [0] + args.distances:
        module.stream_sum(buffer, distance)  # warm-up
        start = time.perf_counter()
        for _ in range(args.rounds):
            module.stream_sum(buffer, distance)
        rate = buffer.nbytes * args.rounds / (time.perf_counter() - start) / 1e9
        print(f"| {'none' if distance == 0 else f'{distance} B'} | {rate:.1f} |")


if __name__ == "__main__":
    main()
