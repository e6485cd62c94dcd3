"""Decode on the GPU at the roofline: batch-1 tokens/s as a fraction of HBM bandwidth, with and
without CUDA graphs and the Triton operators, and throughput against HF transformers at batch 1/16/64.

One random-weight model of a real shape (``effinfer bench make-model``'s presets; by default
Qwen2.5-1.5B's shapes in bf16), the core benchmark's runners (``effinfer/bench``):

1. batch-1 greedy decode of ``--tokens`` tokens after a 32-token prompt, best of ``--rounds``,
   for each engine setting: effinfer with CUDA graphs and the Triton operators (the default),
   Triton operators without graphs (``EFFINFER_CUDA_GRAPHS=0``), the PyTorch layers without graphs
   (also ``EFFINFER_TRITON_OPS=0``: the path before either existed), and HF transformers. The
   fraction of HBM bandwidth is weight bytes x tokens/s / peak, with the peak from the datasheet
   for the device name (H200 4.8 TB/s, H100 SXM 3.35 TB/s) or else a measured device-to-device
   copy (also reported, as the bandwidth a kernel can actually reach);
2. throughput of ``--batches`` concurrent requests (32-token prompts, ``--tokens`` new tokens each)
   for effinfer (default settings) and HF transformers (padded ``generate``);
3. optionally (``--schemes int8 int4 …``) batch-1 decode of quantized weights.

Results go to ``--out`` (JSON) and the .md beside it after every measurement, so a later failure
or time-out keeps what was measured. Run on a GPU: ``python benchmarks/gpu_decode.py --out
results.json``; ``--device cpu --preset tiny`` runs the same script on a CPU (a smoke test of the
script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from effinfer.bench.hf import HFRunner
from effinfer.bench.models import PRESETS, make_random_model
from effinfer.bench.throughput import EffinferRunner
from effinfer.bench.workload import Workload
from effinfer.engine.cuda_graphs import SWITCH as GRAPHS_SWITCH
from effinfer.kernels.triton import gpu_ops

# (label, CUDA graphs, Triton operators)
SETTINGS = [
    ("effinfer bf16, CUDA graphs + Triton ops", True, True),
    ("effinfer bf16, Triton ops, no graphs", False, True),
    ("effinfer bf16, PyTorch ops, no graphs", False, False),
]
QUANT_SCHEMES = ["int8", "int4", "nf4", "fp8"]
PROMPT_TOKENS = 32


def datasheet_bandwidth(device_name: str) -> float | None:
    """HBM bytes/s from the datasheet for the cards we know by name, else None."""
    if "H200" in device_name:
        return 4.8e12
    if "H100" in device_name and ("HBM3" in device_name or "SXM" in device_name):
        return 3.35e12  # H100 SXM (reports itself as "NVIDIA H100 80GB HBM3")
    return None


def measured_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write) of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    stop.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(stop) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


def set_switches(graphs: bool, triton: bool) -> None:
    """Engine switches for the next runner: read when its model runner is built."""
    os.environ[GRAPHS_SWITCH] = "1" if graphs else "0"
    os.environ[gpu_ops.SWITCH] = "1" if triton else "0"
    gpu_ops.kernels.cache_clear()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def best_decode(runner, prompt: list[int], tokens: int, rounds: int) -> dict:
    runner.decode(prompt, 8, desc="warm-up")  # compiles kernels, captures the batch-1 graph
    best = max((runner.decode(prompt, tokens) for _ in range(rounds)), key=lambda r: r.tokens_per_s)
    return best.to_dict()


def workload(batch: int, tokens: int, vocab: int) -> Workload:
    g = torch.Generator().manual_seed(batch)
    prompts = [
        [1] + torch.randint(3, vocab, (PROMPT_TOKENS - 1,), generator=g).tolist() for _ in range(batch)
    ]
    return Workload(f"batch {batch}", prompts, [tokens] * batch)


def measure_throughput(runner, key: str, args: argparse.Namespace, vocab: int, report: Report) -> None:
    """Output tokens/s of each batch size's workload, recorded under ``key`` as it comes."""
    for batch in args.batches:
        result = runner.throughput(workload(batch, args.tokens, vocab), desc=f"{key} batch {batch}")
        report.throughput.setdefault(batch, {})[key] = result.output_tokens_per_s
        report.write()
        print(f"  {key} batch {batch}: {result.output_tokens_per_s:.0f} tok/s", flush=True)


class Report:
    """Results so far, written to JSON and markdown after every measurement."""

    def __init__(self, out: Path | None, meta: dict) -> None:
        self.out, self.meta = out, meta
        self.decode: dict[str, dict] = {}
        self.throughput: dict[str, dict] = {}
        self.errors: list[str] = []

    def fail(self, what: str, error: BaseException) -> None:
        line = (
            f"{what}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        )
        print("  " + line, flush=True)
        self.errors.append(line)
        self.write()

    def markdown(self) -> str:
        m = self.meta
        peak, copy = m.get("peak_bytes_per_s"), m.get("copy_bytes_per_s")
        lines = [
            f"{m['device']}, torch {m['torch']}, preset {m['preset']} ({m['weight_bytes'] / 1e9:.2f} GB of weights "
            f"read per token), {m['tokens']} tokens after a {PROMPT_TOKENS}-token prompt",
            "",
            (f"HBM peak {peak / 1e12:.2f} TB/s ({m['peak_source']})" if peak else "HBM peak: unknown")
            + (f"; measured device-to-device copy {copy / 1e12:.2f} TB/s" if copy else ""),
            "",
            "| batch-1 decode | tokens/s | ms/token (median) | weight GB/s | % of HBM peak "
            "| % of copy bandwidth | graphs captured | Triton ops |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for label, r in self.decode.items():
            gbs = r["weight_gb_per_s"]
            lines.append(
                f"| {label} | {r['tokens_per_s']:.1f} | {r['median_ms_per_token']:.2f} | {gbs:.0f} | "
                f"{f'{100 * gbs * 1e9 / peak:.0f}%' if peak else '-'} | "
                f"{f'{100 * gbs * 1e9 / copy:.0f}%' if copy else '-'} | {r.get('graphs_captured', '-')} | "
                f"{r.get('triton_ops', '-')} |"
            )
        if self.throughput:
            lines += [
                "",
                "| batch | effinfer tok/s | HF transformers tok/s | x HF |",
                "| ---: | ---: | ---: | ---: |",
            ]
            for batch, r in self.throughput.items():
                ours, hf = r.get("effinfer"), r.get("hf")
                ratio = f"{ours / hf:.2f}" if ours and hf else "-"
                lines.append(
                    f"| {batch} | {f'{ours:.0f}' if ours else '-'} | {f'{hf:.0f}' if hf else '-'} | {ratio} |"
                )
        if self.errors:
            lines += ["", "Failures:", *[f"- {e}" for e in self.errors]]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = dict(meta=self.meta, decode=self.decode, throughput=self.throughput, errors=self.errors)
        self.out.write_text(json.dumps(data, indent=1))
        self.out.with_suffix(".md").write_text(self.markdown())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON results (a .md table is written beside it)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="qwen2.5-1.5b", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="batch-1 decode runs per setting (best counts)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64], help="throughput batch sizes")
    parser.add_argument(
        "--schemes", nargs="*", default=[], choices=QUANT_SCHEMES, help="quantized decode too"
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1 or any(b < 1 for b in args.batches):
        parser.error("--tokens, --rounds and --batches must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --preset tiny for a smoke test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, preset {args.preset}", flush=True)
    started = time.perf_counter()
    meta: dict = dict(
        device=name, torch=torch.__version__, preset=args.preset, tokens=args.tokens, weight_bytes=0
    )
    peak = datasheet_bandwidth(name)
    copy = measured_copy_bandwidth(device) if on_cuda else None
    meta.update(
        peak_bytes_per_s=peak or copy,
        peak_source="datasheet" if peak else "measured copy",
        copy_bytes_per_s=copy,
    )
    report = Report(args.out, meta)
    g = torch.Generator().manual_seed(0)
    vocab = PRESETS[args.preset]["vocab_size"]
    prompt = [1] + torch.randint(3, min(vocab, 30000), (PROMPT_TOKENS - 1,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = str(make_random_model(Path(tmp) / "model", args.preset))
        print(f"  wrote the random model in {time.perf_counter() - t0:.0f} s", flush=True)
        engine_args = dict(
            dtype="bfloat16", device=args.device, show_progress=False, max_num_seqs=max(args.batches + [1])
        )
        settings = [(label, graphs, triton, None) for label, graphs, triton in SETTINGS]
        settings += [(f"effinfer {s}, CUDA graphs + Triton ops", True, True, s) for s in args.schemes]
        for label, graphs, triton, scheme in settings:
            t0 = time.perf_counter()
            set_switches(graphs, triton)
            try:
                runner = EffinferRunner(model, quantization=scheme, **engine_args)
                meta["weight_bytes"] = meta["weight_bytes"] or runner.weight_bytes
                result = best_decode(runner, prompt, args.tokens, args.rounds)
                captured = runner.engine.runner.decode_graphs
                result["graphs_captured"] = (
                    ",".join(map(str, captured.captured_sizes)) if captured else "none"
                )
                # Whether the Triton operators loaded (the start-up self-test may have turned them off).
                result["triton_ops"] = "on" if on_cuda and gpu_ops.kernels() is not None else "off"
                report.decode[label] = result
                runner.close()
            except Exception as error:  # report and go on: one broken setting must not hide the rest
                report.fail(label, error)
                continue
            finally:
                free(device)
            report.write()
            print(
                f"  {label}: {result['tokens_per_s']:.1f} tok/s ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        set_switches(True, True)
        if not args.no_hf:
            try:
                hf = HFRunner(model, torch.bfloat16, device, num_threads=4, show_progress=False)
                meta["weight_bytes"] = meta["weight_bytes"] or hf.weight_bytes
                report.decode["HF transformers bf16"] = best_decode(hf, prompt, args.tokens, args.rounds)
                report.write()
                print(
                    f"  HF bf16: {report.decode['HF transformers bf16']['tokens_per_s']:.1f} tok/s",
                    flush=True,
                )
                measure_throughput(hf, "hf", args, vocab, report)
                hf.close()
            except Exception as error:
                report.fail("HF transformers", error)
            finally:
                free(device)
        try:
            runner = EffinferRunner(model, **engine_args)
            for batch in args.batches:  # compiles the kernels and captures each batch's graph
                runner.throughput(workload(batch, 4, vocab), desc="warm-up")
            measure_throughput(runner, "effinfer", args, vocab, report)
            runner.close()
        except Exception as error:
            report.fail("effinfer throughput", error)
        finally:
            free(device)
    report.write()
    print(report.markdown())
    print(f"total {time.perf_counter() - started:.1f} s")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
