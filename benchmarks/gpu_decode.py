"""End-to-end batch-1 decode on the GPU: effinfer bf16 and each quantization scheme, HF transformers as the peer.

One run, one random-weight TinyLlama-1.1B-shaped model (``effinfer bench make-model``'s preset),
the core benchmark's runners (``effinfer/bench``): greedy decode of ``--tokens`` tokens after a
32-token prompt, one warm-up pass per engine, the best of ``--rounds``. Reports tokens/s, the
speedup over HF transformers bf16 and over effinfer bf16, and the weight bytes streamed per second.

Run on a GPU: ``python benchmarks/gpu_decode.py --out results.json`` (also writes results.md).
``--device cpu --preset tiny`` runs the same script on a CPU (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from effinfer.bench.hf import HFRunner
from effinfer.bench.models import make_random_model
from effinfer.bench.throughput import EffinferRunner

SCHEMES = ["bf16", "int8", "int4", "nf4", "fp8"]  # "bf16": no quantization


def measure(runner, prompt: list[int], tokens: int, rounds: int) -> dict:
    runner.decode(prompt, 8, desc="warm-up")
    best = max((runner.decode(prompt, tokens) for _ in range(rounds)), key=lambda r: r.tokens_per_s)
    return best.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON results (a .md table is written beside it)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="tinyllama-1.1b")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schemes", nargs="*", default=SCHEMES)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, preset {args.preset}", flush=True)
    started = time.perf_counter()
    prompt = [1] + torch.randint(100, 30000, (31,), generator=torch.Generator().manual_seed(0)).tolist()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_random_model(Path(tmp) / "model", args.preset)
        prompt = [t % 256 for t in prompt] if args.preset == "tiny" else prompt
        for scheme in args.schemes:
            t0 = time.perf_counter()
            try:
                runner = EffinferRunner(
                    str(model), dtype="bfloat16", device=args.device, show_progress=False,
                    quantization=None if scheme == "bf16" else scheme,
                )  # fmt: skip
                results[f"effinfer {scheme}"] = measure(runner, prompt, args.tokens, args.rounds)
                runner.close()
            except Exception as e:  # report and go on: one broken scheme must not hide the rest
                print(f"  effinfer {scheme}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            r = results[f"effinfer {scheme}"]
            print(
                f"  effinfer {scheme}: {r['tokens_per_s']:.1f} tok/s ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        if not args.no_hf:
            runner = HFRunner(str(model), torch.bfloat16, device, num_threads=4, show_progress=False)
            results["HF transformers bf16"] = measure(runner, prompt, args.tokens, args.rounds)
            runner.close()
            print(f"  HF bf16: {results['HF transformers bf16']['tokens_per_s']:.1f} tok/s", flush=True)

    hf = results.get("HF transformers bf16", {}).get("tokens_per_s")
    base = results.get("effinfer bf16", {}).get("tokens_per_s")
    lines = [
        "| engine, weights | tokens/s | ms/token (median) | x HF bf16 | x effinfer bf16 | weight GB/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in results.items():
        tps = r["tokens_per_s"]
        lines.append(
            f"| {label} | {tps:.1f} | {r['median_ms_per_token']:.2f} | {f'{tps / hf:.2f}' if hf else '-'} | "
            f"{f'{tps / base:.2f}' if base else '-'} | {r['weight_gb_per_s']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=name, torch=torch.__version__, preset=args.preset, tokens=args.tokens)
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        args.out.with_suffix(".md").write_text(f"{name}, torch {torch.__version__}\n\n{text}\n")


if __name__ == "__main__":
    main()
