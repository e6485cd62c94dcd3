"""bf16 matrix products on CPU: the AMX skinny-GEMM kernel vs oneDNN, per TinyLlama layer shape and batch.

Three ways to compute x @ W^T with a bf16 weight, each timed on different copies of the weight
in turn (at least ``--copies``, and at least 600 MB of them: more than the last-level cache
holds, so every call streams W from DRAM, as a decode step does):
  * skinny    kernels/cpu/skinny.py on the plain row-major weight (effinfer's decode path, <= 64 rows)
  * prepacked oneDNN on a weight reordered once into its blocked layout (effinfer's previous path)
  * F.linear  oneDNN on the plain weight (what HF transformers runs, and effinfer's prefill path)
Prints ms per call and the weight bytes read per second. Run:
``python benchmarks/dense_kernels.py [--copies 12] [--batches 1 16 64 1024] [--markdown FILE]``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from quant_kernels import TINYLLAMA_SHAPES, _time_per_call

import effinfer  # noqa: F401  (2 MiB pages for the weights, as in the engine)
from effinfer.kernels.cpu import skinny

SHAPES = TINYLLAMA_SHAPES + [("lm_head", 32000, 2048)]


def dense_table(batches: list[int], copies: int, min_seconds: float = 0.3) -> list[dict]:
    rows = []
    for name, n, k in SHAPES:
        torch.manual_seed(0)
        # At least ~600 MB of each shape, so no copy is still in the last-level cache when it comes round.
        copies = max(copies, int(600e6 // (n * k * 2)) + 1)
        weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        for m in batches:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            row = {"shape": name, "n": n, "k": k, "m": m}
            if skinny.supports(weights[0]) and m <= skinny.MAX_ROWS:
                row["skinny_ms"] = _time_per_call(
                    lambda w, x: skinny.linear(x, w, None), weights, x, min_seconds
                )
            row["prepacked_ms"] = _time_per_call(
                lambda p, x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                packed,
                x,
                min_seconds,
            )
            row["linear_ms"] = _time_per_call(lambda w, x: F.linear(x, w), weights, x, min_seconds)
            rows.append(row)
        del weights, packed
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| layer (out x in) | rows | skinny ms | prepacked ms | F.linear ms | skinny GB/s | prepacked GB/s "
        "| skinny / prepacked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gb = r["n"] * r["k"] * 2 / 1e9
        sk = r.get("skinny_ms")
        cells = [
            f"{r['shape']} ({r['n']} x {r['k']})",
            str(r["m"]),
            f"{sk:.3f}" if sk else "-",
            f"{r['prepacked_ms']:.3f}",
            f"{r['linear_ms']:.3f}",
            f"{gb / sk * 1e3:.1f}" if sk else "-",
            f"{gb / r['prepacked_ms'] * 1e3:.1f}",
            f"{r['prepacked_ms'] / sk:.2f}x" if sk else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=12)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 1024])
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args()
    if skinny.extension() is None:
        print("the skinny kernel cannot run here (needs AMX-BF16 and a C++ compiler): only oneDNN is timed")
    print(f"threads={torch.get_num_threads()} copies={args.copies}")
    emit_table(markdown(dense_table(args.batches, args.copies)), args.markdown)


def emit_table(table: str, path: str | None) -> None:
    """Print a markdown table, and write it to ``path`` too when one is given."""
    print(table)
    if path:
        with open(path, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
