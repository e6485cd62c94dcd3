"""GPU quantized matmuls (Triton W8A16 / W4A16 / NF4, fp8 via _scaled_mm) against bf16 cuBLAS, per layer shape and batch.

For TinyLlama-1.1B and Llama-7B layer shapes and M = 1, 16, 64, 256 rows, times one y = x @ W^T
with CUDA events over CUDA-graph replays (so Python launch overhead is not counted), cycling
through enough copies of each weight that they do not fit in L2 (decode streams weights from
HBM). Reports microseconds per call, the speedup over bf16, achieved GB/s (weight + activation
+ output bytes) against the card's datasheet bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s), and
each kernel's error against its fp32 reference (a timing of a wrong kernel is worth nothing).
``w4a16`` / ``w8a16`` / ``nf4`` are what a layer runs (``woq.apply``'s choice by row count); the
other rows time each path alone: ``-gemv`` the CUDA-core one-row kernel, ``-fused`` the tensor-
core tiles, ``-dequant`` dequantize-then-cuBLAS, ``nf4-*-gather|select`` the two level lookups
(block 64), ``nf4-chunked`` the decode-chunk-then-cuBLAS fallback.

Run on a GPU: ``python benchmarks/gpu_quant.py --out results.json`` (also writes results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effinfer.kernels import codebook_linear
from effinfer.kernels.triton import fp8, woq
from effinfer.quant.codebook import quantize_codebook
from effinfer.quant.fp8 import quantize_fp8
from effinfer.quant.fp8 import reference as fp8_reference
from effinfer.quant.integer import quantize_rtn

SHAPES = [  # (name, out_features N, in_features K)
    ("tinyllama.qkv", 2560, 2048),
    ("tinyllama.o", 2048, 2048),
    ("tinyllama.gate_up", 11264, 2048),
    ("tinyllama.down", 2048, 5632),
    ("llama7b.gate", 11008, 4096),
    ("llama7b.down", 4096, 11008),
]
ROWS = (1, 2, 4, 16, 64, 256)
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}  # datasheet HBM bandwidth by card name; H100 SXM otherwise
STREAM_BYTES = 256 << 20  # weights cycled per measurement: several times the 50 MB L2


def _clone_state(state):
    return dataclasses.replace(
        state, **{f.name: getattr(state, f.name).clone() for f in dataclasses.fields(state)
                  if isinstance(getattr(state, f.name), torch.Tensor) and f.name != "perm"}
    )  # fmt: skip


def _time_us(fn, states: list, x: torch.Tensor, reps: int = 5) -> float:
    """Microseconds per call: a CUDA graph of one call per state, replayed ``reps`` times."""
    for s in states[:2]:
        fn(s, x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for s in states:
                fn(s, x)
        graph.replay()
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
    except RuntimeError as e:  # not capturable: time the launches (host overhead included)
        print(f"  (no CUDA graph: {str(e).splitlines()[0]})")
        start.record()
        for _ in range(reps):
            for s in states:
                fn(s, x)
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(states))


def _with_lookup(fn, kernel: str, lookup: str):
    """``fn`` with ``woq.LEVEL_LOOKUP[kernel]`` set to ``lookup`` while it launches (and is captured)."""

    def run(state, x):
        saved = woq.LEVEL_LOOKUP[kernel]
        woq.LEVEL_LOOKUP[kernel] = lookup
        try:
            return fn(state, x)
        finally:
            woq.LEVEL_LOOKUP[kernel] = saved

    return run


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def bench_shape(name: str, n: int, k: int, rows, methods: set[str]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float32) * 0.02
    w_bf16 = w.bfloat16()
    q8 = quantize_rtn(w, 8, None, symmetric=True)
    q4 = quantize_rtn(w, 4, 128, symmetric=False)
    f8 = quantize_fp8(w)
    nf = quantize_codebook(w, "nf4", 64)
    variants: dict[str, tuple] = {}  # name -> (fn, state, weight bytes, reference weight or (kind, obj))

    def dense(state, x):
        return F.linear(x, state)

    variants["bf16"] = (dense, w_bf16, n * k * 2, ("dense", w_bf16.float()))
    s8 = woq.prepare(q8, None, torch.bfloat16)
    s4 = woq.prepare(q4, None, torch.bfloat16)
    variants["w8a16"] = (woq.apply, s8, q8.nbytes(), ("woq", q8))
    variants["w4a16"] = (woq.apply, s4, q4.nbytes(), ("woq", q4))
    variants["w4-fused"] = (woq.fused_matmul, s4, q4.nbytes(), ("woq", q4))
    variants["w4-dequant"] = (woq.dequant_matmul, s4, q4.nbytes(), ("woq", q4))
    variants["w8-fused"] = (woq.fused_matmul, s8, q8.nbytes(), ("woq", q8))
    variants["w8-dequant"] = (woq.dequant_matmul, s8, q8.nbytes(), ("woq", q8))
    variants["w4-gemv"] = (woq.gemv, s4, q4.nbytes(), ("woq", q4))
    variants["w8-gemv"] = (woq.gemv, s8, q8.nbytes(), ("woq", q8))
    variants["w4-gather"] = (
        lambda s, x: woq.fused_matmul(s, x, unpack="gather"),
        s4,
        q4.nbytes(),
        ("woq", q4),
    )
    variants["nf4"] = (woq.apply, woq.prepare_codebook(nf, None, torch.bfloat16), nf.nbytes(), ("woq", nf))
    sn = variants["nf4"][1]
    for lookup in ("gather", "select"):
        for path, kernel, fn in (("gemv", "gemv", woq.gemv), ("fused", "tile", woq.fused_matmul)):
            variants[f"nf4-{path}-{lookup}"] = (
                _with_lookup(fn, kernel, lookup),
                sn,
                nf.nbytes(),
                ("woq", nf),
            )
    variants["nf4-dequant"] = (woq.dequant_matmul, sn, nf.nbytes(), ("woq", nf))
    variants["nf4-chunked"] = (
        codebook_linear.apply,
        codebook_linear.prepare(nf, None, torch.bfloat16),
        nf.nbytes(),
        ("woq", nf),
    )
    sf = fp8.prepare(f8, None, torch.bfloat16)
    if sf is not None:
        act = "token" if sf.mode == "rowwise" else "tensor"
        variants["fp8"] = (fp8.apply, sf, f8.nbytes(), ("fp8", (f8, act)))

    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for vname, (fn, state, wbytes, ref) in variants.items():
            if vname not in methods:
                continue
            if ("gemv" in vname or vname == "w4-gather") and m > 16:
                continue
            if vname == "nf4-chunked" and m not in (1, max(rows)):
                continue
            kind, obj = ref
            if kind == "dense":
                expected = F.linear(x.float(), obj)
            elif kind == "woq":
                expected = obj.reference_linear(x.float(), None)
            else:
                expected = fp8_reference(x.float(), obj[0], None, obj[1]).float()
            try:
                err = _rel_err(fn(state, x), expected)
                copies = max(1, math.ceil(STREAM_BYTES / wbytes))
                states = [state] + [
                    _clone_state(state) if not isinstance(state, torch.Tensor) else state.clone()
                    for _ in range(copies - 1)
                ]
                us = _time_us(fn, states, x)
                del states
            except Exception as e:  # report and go on: one broken variant must not hide the rest
                print(f"  {name} m={m} {vname}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            moved = wbytes + m * k * 2 + m * n * 2
            results.append(
                dict(shape=name, n=n, k=k, m=m, method=vname, us=us, gbs=moved / us / 1e3,
                     tflops=2 * m * n * k / us / 1e6, rel_err=err, weight_bytes=wbytes)
            )  # fmt: skip
    return results


def peak_gbs(device_name: str) -> float:
    return next((v for k, v in PEAK_GBS.items() if k in device_name), PEAK_GBS["H100"])


def table(results: list[dict], peak: float) -> str:
    bf16 = {(r["shape"], r["m"]): r["us"] for r in results if r["method"] == "bf16"}
    lines = [
        f"| shape | N x K | M | method | us | x bf16 | GB/s | % of {peak / 1000:.2f} TB/s | TFLOP/s | rel err |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        base = bf16.get((r["shape"], r["m"]))
        speedup = f"{base / r['us']:.2f}" if base else "-"
        lines.append(
            f"| {r['shape']} | {r['n']}x{r['k']} | {r['m']} | {r['method']} | {r['us']:.1f} | {speedup} | "
            f"{r['gbs']:.0f} | {100 * r['gbs'] / peak:.0f}% | {r['tflops']:.1f} | {r['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON results (a .md table is written beside it)"
    )
    parser.add_argument("--rows", type=int, nargs="*", default=list(ROWS))
    parser.add_argument("--shapes", nargs="*", default=None, help="shape names to run (default: all)")
    parser.add_argument(
        "--methods", nargs="*",
        default=["bf16", "w8a16", "w4a16", "nf4", "fp8", "w4-gemv", "w4-fused", "w4-dequant", "w8-gemv",
                 "w8-fused", "w8-dequant", "w4-gather", "nf4-gemv-gather", "nf4-gemv-select", "nf4-fused-gather",
                 "nf4-fused-select", "nf4-dequant", "nf4-chunked"],
    )  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"fp8 scaling: {fp8.scaling_mode(0) if fp8.supported(torch.device('cuda')) else 'unsupported'}")  # fmt: skip
    started = time.perf_counter()
    results: list[dict] = []
    for name, n, k in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        t0 = time.perf_counter()
        results += bench_shape(name, n, k, args.rows, set(args.methods))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s")
    peak = peak_gbs(props.name)
    text = table(results, peak)
    print(text)
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=props.name, torch=torch.__version__, peak_gbs=peak,
                    dequant_min_m=woq.DEQUANT_MIN_M, unpack=woq.UNPACK)  # fmt: skip
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        args.out.with_suffix(".md").write_text(f"{props.name}, torch {torch.__version__}\n\n{text}\n")


if __name__ == "__main__":
    main()
