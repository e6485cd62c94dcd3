"""What each CPU decode technique buys: effinfer bench with the skinny GEMM and the fused ops on and off.

Runs ``effinfer bench`` (batch-1 decode and 16 concurrent requests, no peer) once per setting,
each in its own process, with the kernels switched off through their environment variables:
  all on              the default
  no skinny GEMM      EFFINFER_CPU_SKINNY=0: oneDNN's prepacked bf16 GEMM for every batch size
  no fused ops        EFFINFER_CPU_FUSED=0: norms, rotary, SiLU and decode attention in plain PyTorch
  neither             both off (the engine before these two kernels)
Run: ``python benchmarks/cpu_decode_ablation.py --model /tmp/tinyllama [--markdown FILE]``
(make the model with ``effinfer bench make-model --preset tinyllama-1.1b --out /tmp/tinyllama``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from dense_kernels import emit_table

SETTINGS = [
    ("all on", {}),
    ("no skinny GEMM", {"EFFINFER_CPU_SKINNY": "0"}),
    ("no fused ops", {"EFFINFER_CPU_FUSED": "0"}),
    ("neither", {"EFFINFER_CPU_SKINNY": "0", "EFFINFER_CPU_FUSED": "0"}),
]


def run_bench(model: str, env_extra: dict, decode_tokens: int, concurrent_len: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [
            sys.executable, "-m", "effinfer.cli", "bench", "--model", model, "--dtype", "bfloat16",
            "--batch-decode-tokens", str(decode_tokens), "--concurrent", "16",
            # one tiny offline request: the offline scenario cannot be skipped
            "--num-requests", "1", "--input-len-range", "8:8", "--output-len-range", "4:4",
            "--concurrent-input-len", str(concurrent_len), "--concurrent-output-len", str(concurrent_len),
            "--json", out, "--no-progress",
        ]  # fmt: skip
        subprocess.run(cmd, env={**os.environ, **env_extra}, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def metric(report: dict, scenario: str, name: str) -> float:
    return report["results"][scenario]["effinfer"][name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument(
        "--concurrent-len", type=int, default=64, help="prompt and output length of the 16 requests"
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()
    lines = [
        "| setting | batch-1 ms/token | x all on | 16 concurrent wall s | x all on |",
        "|---|---:|---:|---:|---:|",
    ]
    base = None
    for name, env in SETTINGS:
        report = run_bench(args.model, env, args.decode_tokens, args.concurrent_len)
        ms = metric(report, "decode", "median_ms_per_token")
        wall = metric(report, "concurrent", "seconds")
        base = base or (ms, wall)
        lines.append(f"| {name} | {ms:.1f} | {ms / base[0]:.2f} | {wall:.2f} | {wall / base[1]:.2f} |")
        print(lines[-1], flush=True)
    emit_table("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
