"""Perplexity vs parameter reduction of low-rank factorization: plain SVD vs activation-aware (SVD-LLM, ASVD).

Each point runs what a user runs: ``effinfer compress --low-rank RATIO --method M`` (the same
``compress_low_rank`` function) writes a checkpoint, ``LLM(OUT)`` loads it, and sliding-window
perplexity is measured on text the calibration never saw: calibration on the last 200 KB of
``../shared/data/text/tinystories_valid.txt``, evaluation on the first ``--windows`` windows of 512
tokens of the rest. The baseline is the source model itself (a GGUF file is dequantized to bf16;
its factors are taken from those same dequantized weights). Points already in ``--json`` from a run
with the same model, texts, windows and calibration rows are kept, not measured again. ``--speed`` also times greedy decoding
(batch 1) of the dense model and of one factorized model on the CPU.

``--speed-only RATIO:METHOD`` skips the curve (timings need a quiet machine, perplexity does not):
it factorizes once, then times every decoder Linear at batch 1 (bf16, dense against factorized,
with the bytes each reads) and greedy batch-1 decoding of both models, taking turns. The dense
side of a GGUF model is its dequantized bf16 weights (as the factors are), not its quantized kernels.

    python benchmarks/low_rank.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --speed-only 0.6:svd --json docs/results/low_rank_speed_smollm2.json

    python benchmarks/low_rank.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --ratios 0.9,0.8,0.7,0.6 --methods svd,svd-llm --json docs/results/low_rank.json \
        --plot docs/low_rank_ppl.png --speed 0.7:svd-llm
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from effinfer import LLM, SamplingParams  # noqa: E402
from effinfer.compress.lowrank import LowRankOptions  # noqa: E402
from effinfer.compress.lowrank_cli import compress_low_rank  # noqa: E402
from effinfer.compress.prune.pipeline import load_source, save_pruned  # noqa: E402
from effinfer.default_model import heldout_text_path  # noqa: E402
from effinfer.eval.perplexity import perplexity  # noqa: E402
from effinfer.loading.gguf import is_gguf_file  # noqa: E402
from effinfer.quant.lowrank import LowRankWeight  # noqa: E402

CALIB_BYTES = 200_000
KV_CACHE_BYTES = 256 * 2**20  # plenty for one 512-token window; the machine is shared


def texts(shared: Path, work: Path, which: str) -> tuple[Path, str]:
    """(calibration file, evaluation text): disjoint parts of TinyStories, or the default model's held-out files."""
    if which == "heldout":
        return heldout_text_path("calibration"), heldout_text_path("evaluation").read_text()
    valid = (shared / "text" / "tinystories_valid.txt").read_text()
    calib = work / "calib.txt"
    calib.write_text(valid[-CALIB_BYTES:])
    return calib, valid[:-CALIB_BYTES]


def evaluate(model: Path, text: str, windows: int, threads: int | None = None) -> float:
    llm = LLM(
        str(model), dtype="bfloat16", kv_cache_memory=KV_CACHE_BYTES, num_threads=threads, show_progress=False
    )
    return perplexity(llm, text=text, ctx=512, max_windows=windows, show_progress=False).perplexity


def decode_speed(model: Path, tokens: int = 64, runs: int = 3) -> float:
    """Median tokens/s of greedy batch-1 decoding over ``runs`` runs (after one warm-up run)."""
    llm = LLM(str(model), dtype="bfloat16", kv_cache_memory=KV_CACHE_BYTES, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(["Once upon a time"], params)
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate(["Once upon a time"], params)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def kernel_bytes(linear: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of weight one product reads. Factors are stored in float32 but the kernel runs them in
    the model's dtype (``kernels/lowrank_linear.py``), so their stored size would double-count."""
    if isinstance(linear.quantized, LowRankWeight):
        factors = (t for t in (*linear.quantized.us, *linear.quantized.vs) if t is not None)
        return sum(t.numel() for t in factors) * dtype.itemsize
    return linear.weight_nbytes()


def linear_timings(model: Path, runs: int = 200) -> dict[str, tuple[float, int]]:
    """Per decoder Linear: (median microseconds of one batch-1 bf16 product, bytes its kernel reads)."""
    llm = LLM(str(model), dtype="bfloat16", kv_cache_memory=KV_CACHE_BYTES, show_progress=False)
    timings = {}
    with torch.no_grad():
        for name, linear in llm.engine.runner.model.compressible_linears():
            x = torch.randn(1, linear.in_features, dtype=torch.bfloat16)
            for _ in range(20):
                linear(x)
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(runs // 5):
                    linear(x)
                samples.append((time.perf_counter() - start) / (runs // 5) * 1e6)
            timings[name] = (statistics.median(samples), kernel_bytes(linear, torch.bfloat16))
    return timings


def speed_only(args: argparse.Namespace, calib: Path) -> dict:
    """Kernel-level and decode-level CPU speed of one factorized model against the dense one."""
    ratio, method = args.speed_only.split(":")
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "factorized"
        _, report = compress_low_rank(args.model, out, LowRankOptions(float(ratio), method), calib,
                                      args.num_samples, 256, show_progress=False)  # fmt: skip
        source = Path(args.model).expanduser()
        if is_gguf_file(source):  # a GGUF would run its quantized kernels: compare with its bf16 weights
            source = save_pruned(
                load_source(source, show_progress=False), Path(work) / "dense", {"method": "none"}
            )
        dense, factorized = linear_timings(source), linear_timings(out)
        rates = {"dense": [], "factorized": []}
        for _ in range(3):  # the models take turns, so a busy moment hits both alike
            rates["dense"].append(decode_speed(source, runs=1))
            rates["factorized"].append(decode_speed(out, runs=1))
    layers = [{"linear": name, "dense_us": dense[name][0], "dense_bytes": dense[name][1],
               "low_rank_us": factorized[name][0], "low_rank_bytes": factorized[name][1]} for name in dense]  # fmt: skip
    total = {
        key: sum(row[key] for row in layers)
        for key in ("dense_us", "dense_bytes", "low_rank_us", "low_rank_bytes")
    }
    result = {"model": str(args.model), "factorized": args.speed_only, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "kept_parameters": report.parameters_after / report.parameters_before,
              "linears_total": total, "linears": layers,
              "decode_tok_s": {name: statistics.median(r) for name, r in rates.items()}}  # fmt: skip
    print(f"decoder Linears at batch 1: dense {total['dense_us']:.0f} us for {total['dense_bytes'] / 2**20:.1f} MiB, "
          f"low-rank {total['low_rank_us']:.0f} us for {total['low_rank_bytes'] / 2**20:.1f} MiB")  # fmt: skip
    print(f"greedy decode (median of 3): {json.dumps(result['decode_tok_s'])} tokens/s")
    return result


def plot(results: list[dict], base: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["removed_pct"])
        ax.plot([r["removed_pct"] for r in rows], [r["perplexity"] for r in rows], "o-", label=method)
    ax.axhline(base, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("parameters removed from the decoder Linears (%)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(args: argparse.Namespace, base: float, results: list[dict], speed: dict) -> None:
    """Write what is measured so far (JSON and plot), so an interrupted run keeps its points."""
    summary = {"model": str(args.model), "texts": args.texts, "dense_perplexity": base, "windows": args.windows,
               "num_samples": args.num_samples, "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "results": results, "speed": speed}  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(results, base, args.plot)


def earlier_run(args: argparse.Namespace) -> dict:
    """The points an earlier run wrote to ``--json`` with the same model, texts and sizes (runs are long
    on a CPU, so a later run adds points instead of measuring them again)."""
    if not args.json or not Path(args.json).is_file():
        return {}
    earlier = json.loads(Path(args.json).read_text())
    keys = ("model", "texts", "windows", "num_samples")
    same = all(earlier.get(k) == (str(args.model) if k == "model" else getattr(args, k)) for k in keys)
    return earlier if same and "results" in earlier else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory or GGUF file")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--ratios", default="0.9,0.8,0.7,0.6", help="parameter shares to keep")
    parser.add_argument("--methods", default="svd,svd-llm", help="comma-separated: svd, asvd, svd-llm")
    parser.add_argument("--texts", choices=("tinystories", "heldout"), default="tinystories",
                        help="heldout: the default model's held-out Python files (calibration / evaluation)")  # fmt: skip
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration rows of 256 tokens")
    parser.add_argument("--speed", help="RATIO:METHOD of the model whose decode speed is compared with dense")
    parser.add_argument(
        "--speed-only", metavar="RATIO:METHOD", help="only time this factorized model against dense"
    )
    parser.add_argument("--threads", type=int,
                        help="CPU threads for the perplexity runs (1 on a busy shared machine; not for timings)")  # fmt: skip
    parser.add_argument("--json", help="write the results as JSON")
    parser.add_argument("--plot", help="perplexity vs parameters removed (png)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work:
        calib, text = texts(Path(args.shared), Path(work), args.texts)
        if args.speed_only:
            result = speed_only(args, calib)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            return 0
        earlier = earlier_run(args)
        base = earlier.get("dense_perplexity") or evaluate(Path(args.model), text, args.windows, args.threads)
        print(f"dense: {base:.3f}", flush=True)
        results, speed = earlier.get("results", []), earlier.get("speed", {})
        done = {(r["method"], r["keep_ratio"]) for r in results}
        # Ratio by ratio, both methods each time, so a run cut short still compares them.
        for ratio in (float(r) for r in args.ratios.split(",")):
            for method in args.methods.split(","):
                if (method, ratio) in done:
                    continue
                start = time.perf_counter()
                out = Path(work) / f"{method}-{ratio}"
                options = LowRankOptions(ratio, method)
                _, report = compress_low_rank(args.model, out, options, calib, args.num_samples, 256)
                ppl = evaluate(out, text, args.windows, args.threads)
                kept = report.parameters_after / report.parameters_before
                row = {"method": method, "keep_ratio": ratio, "kept_pct": 100 * kept,
                       "removed_pct": 100 * (1 - kept), "perplexity": ppl, "seconds": time.perf_counter() - start}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
                if args.speed == f"{ratio}:{method}":
                    speed = {"model": args.speed, "dense_tok_s": decode_speed(Path(args.model)),
                             "low_rank_tok_s": decode_speed(out)}  # fmt: skip
                    print(json.dumps(speed), flush=True)
                save(args, base, results, speed)
        save(args, base, results, speed)
    print("| method | kept | perplexity | vs dense |\n|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {r['kept_pct']:.1f}% | {r['perplexity']:.2f} | {r['perplexity'] / base:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
