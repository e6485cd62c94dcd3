"""Prefill-sized products on GGUF weights: the panel GEMM on the packed blocks vs oneDNN on bf16.

For each kind of linear in layer 0 of a GGUF file (fused q/k/v, o, fused gate/up, down), x of
``--rows`` bf16 rows is multiplied two ways:
  * panel   effinfer's kernel on the blocks as loaded (``woq.apply``, the panel GEMM from
            ``woq.PANEL_MIN_ROWS`` rows): codes dequantized panel by panel into an L2 buffer
  * oneDNN  ``F.linear`` on the same weight dequantized to bf16 once, beforehand (what effinfer
            ran when GGUF weights were expanded at load: ~3.5x the memory of a Q4_K file)
Each takes its turn, round by round, keeping its best round. Prints ms per call, the ratio and
TFLOP/s. Run: ``python benchmarks/gguf_prefill_gemm.py FILE.gguf [--rows 512] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from effinfer import LLM
from effinfer.config import ConfigError
from effinfer.kernels.cpu import woq
from effinfer.layers.linear import Linear


def ms_per_call(fn, min_seconds: float) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls < 3:
        fn()
        calls += 1
    return elapsed / calls * 1e3


def dequantized_bf16(data: woq.WoqData) -> torch.Tensor:
    """The packed weight as dense bf16 [out, in], row by row from the packed blocks (exact)."""
    rows = woq.embedding_rows(data, torch.arange(data.out_features))
    return rows.to(torch.bfloat16).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rows < 1:
        sys.exit(f"error: --rows must be >= 1, got {args.rows}")
    if args.rounds < 1:
        sys.exit(f"error: --rounds must be >= 1, got {args.rounds}")
    if args.threads < 1:
        sys.exit(f"error: --threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        llm = LLM(args.model, dtype="bfloat16", num_threads=args.threads, max_num_seqs=1, max_model_len=256,
                  kv_cache_memory=16 << 20, show_progress=False)  # fmt: skip
    except ConfigError as error:  # a missing or unreadable model: one line, no traceback
        sys.exit(f"error: {error}")
    print(f"{args.model}: {args.rows} rows, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| layer | out x in | bits | panel ms | oneDNN bf16 ms | oneDNN / panel | panel TFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for name, module in llm.engine.model.named_modules():
        if not isinstance(module, Linear) or ".layers.0." not in name:
            continue
        data = getattr(module._kernel_state, "data", None)
        if not isinstance(data, woq.WoqData) or data.table is not None:
            continue
        x = torch.randn(args.rows, data.in_features, dtype=torch.bfloat16)
        dense = dequantized_bf16(data)
        bias = None if data.bias is None else data.bias.to(torch.bfloat16)
        contenders = {
            "panel": lambda data=data, x=x: woq.apply(data, x),
            "onednn": lambda x=x, dense=dense, bias=bias: F.linear(x, dense, bias),
        }
        torch.testing.assert_close(contenders["panel"](), contenders["onednn"](), rtol=3e-2, atol=3e-2)
        best = dict.fromkeys(contenders, float("inf"))
        for _ in range(args.rounds):
            for key, fn in contenders.items():
                best[key] = min(best[key], ms_per_call(fn, args.min_seconds))
        flops = 2 * args.rows * data.in_features * data.out_features
        print(
            f"| {name.rsplit('.', 1)[-1]} | {data.out_features} x {data.in_features} | {data.bits} | "
            f"{best['panel']:.2f} | {best['onednn']:.2f} | {best['onednn'] / best['panel']:.2f}x | "
            f"{flops / best['panel'] / 1e9:.2f} |"
        )


if __name__ == "__main__":
    main()
