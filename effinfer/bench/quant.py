"""``effinfer bench quant``: what weight quantization buys in decode speed and weight memory.

    effinfer bench quant --model DIR [--schemes bf16,int8,int4] [--llama-cpp] [--layer-table]

Every scheme is the same float checkpoint quantized while loading (RTN: int8 per channel,
int4 asymmetric in groups of 128; GPTQ/AWQ checkpoints have the same layout and speed). All
variants are loaded at once and take turns, round by round, on the same prompt, so background
load drifts over all of them alike; the best round of each is reported. ``--llama-cpp`` adds
llama.cpp (through llama-cpp-python) on the same weights: the checkpoint converted to an F16
GGUF by ``effinfer convert``, then quantized to Q8_0 and Q4_0 by llama.cpp's own quantizer, and
effinfer running those very GGUF files. ``--layer-table`` times one Linear layer per scheme at
batch sizes 1 to 64 (``layer_table``), the check that quantized layers never lose to bf16.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from effinfer.bench.report import machine_info
from effinfer.bench.suite import BenchError
from effinfer.config import ConfigError, ModelConfig
from effinfer.quant import registry

# The float baseline, then every scheme ``--quantization`` offers (quant/registry.py).
SCHEMES = {"bf16": None, **{name: name for name in registry.SCHEMES}}
LAYER_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# (in, out) of TinyLlama-1.1B's fused q/k/v, o, fused gate/up and down projections
LAYER_SHAPES = ((2048, 2560), (2048, 2048), (2048, 11264), (5632, 2048))


@dataclass
class VariantResult:
    name: str
    engine: str  # "effinfer" or "llama.cpp"
    weights: str  # what the weights are, for people
    weight_bytes: int  # bytes one decode step reads (layers + output projection)
    tokens_per_s: list[float] = field(default_factory=list)  # one per round

    @property
    def best_tokens_per_s(self) -> float:
        return max(self.tokens_per_s)


@dataclass
class QuantBenchReport:
    command: str
    date: str
    machine: dict
    model: str
    decode_tokens: int
    prompt_tokens: int
    rounds: int
    variants: list[VariantResult]
    layer_table: list[dict] = field(default_factory=list)

    def baseline(self) -> VariantResult:
        return self.variants[0]


# -------------------------------------------------------------------- decode runners


class _EffinferDecode:
    """``EffinferRunner`` (the core benchmark's) loaded with one quantization scheme."""

    engine = "effinfer"

    def __init__(self, name: str, model: str, quantization: str | None, dtype: str, threads: int | None):
        from effinfer.bench.throughput import EffinferRunner

        self.name = name
        self.runner = EffinferRunner(model, dtype=dtype, num_threads=threads, max_num_seqs=1,
                                     show_progress=False, quantization=quantization)  # fmt: skip
        self.weight_bytes = self.runner.weight_bytes
        self.weights = quantization or str(self.runner.dtype).removeprefix("torch.")

    def decode(self, prompt: list[int], num_tokens: int) -> float:
        return self.runner.decode(prompt, num_tokens).tokens_per_s


class _LlamaCppDecode:
    engine = "llama.cpp"

    def __init__(self, name: str, path: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.name = name
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, seed=0, verbose=False)  # fmt: skip
        self.weight_bytes = _gguf_decode_bytes(path)
        self.weights = name.split()[-1]

    def decode(self, prompt: list[int], num_tokens: int) -> float:
        self.llm.reset()
        stamps = []
        eos = self.llm.token_eos()
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                       logits_processor=[_ban(eos)]):  # fmt: skip
            stamps.append(time.perf_counter())
            if len(stamps) == num_tokens + 1:
                break
            del token
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _ban(token_id: int):
    """A llama-cpp-python logits processor that never lets ``token_id`` win (like ignore_eos)."""

    def process(_input_ids, scores):
        scores[token_id] = -float("inf")
        return scores

    return process


def _gguf_decode_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors one decode step reads (all but the token embedding, unless tied)."""
    from effinfer.loading.gguf import GGUFFile

    tensors = GGUFFile(path).tensors
    tied = "output.weight" not in tensors
    return sum(t.nbytes for n, t in tensors.items() if n != "token_embd.weight" or tied)


def _llama_cpp_files(model: Path, workdir: Path) -> dict[str, Path]:
    """F16 GGUF written by effinfer, then Q8_0 and Q4_0 made from it by llama.cpp's own quantizer."""
    import llama_cpp

    from effinfer.convert import convert_to_gguf

    f16 = convert_to_gguf(model, workdir / "model-f16.gguf", "f16")
    out = {}
    for name in ("Q8_0", "Q4_0"):
        target = workdir / f"model-{name.lower()}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.nthread = torch.get_num_threads()
        status = llama_cpp.llama_model_quantize(str(f16).encode(), str(target).encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f16} to {name} (status {status})")
        out[name] = target
    return out


# -------------------------------------------------------------------- one layer, batch sizes 1..64


LAYER_SCHEMES = ("int8", "int4", "nf4")  # the weight-only schemes the layer table can time


def layer_table(
    in_features: int = 2048, out_features: int = 11264, copies: int = 16,
    batch_sizes: tuple[int, ...] = LAYER_BATCH_SIZES, schemes: tuple[str, ...] = ("int8", "int4"),
    repeats: int = 3,
) -> list[dict]:  # fmt: skip
    """ms per call of one Linear layer, bf16 vs each quantized scheme, at each batch size.

    ``copies`` different weights are cycled through so they stream from memory as in a real
    decode step, not from cache (default: TinyLlama's fused gate/up projection, 16 layers' worth).
    """
    from effinfer.layers.linear import Linear
    from effinfer.loading.online_quant import quantize_weight

    torch.manual_seed(0)
    layers: dict[str, list[Linear]] = {"bf16": []}
    for _ in range(copies):
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
        dense = Linear(in_features, out_features)
        dense.weight.data = weight.clone()
        dense.finalize()
        layers["bf16"].append(dense)
        for scheme in schemes:
            layer = Linear(in_features, out_features)
            layer.weight.data = torch.empty(0, dtype=torch.bfloat16)
            layer.set_quantized(quantize_weight(weight.float(), scheme))  # as ``--quantization`` does
            layer.finalize()
            layers.setdefault(scheme, []).append(layer)
    rows = []
    with torch.no_grad():
        for m in batch_sizes:
            x = torch.randn(m, in_features, dtype=torch.bfloat16)
            row = {"shape": f"{in_features}→{out_features}", "batch": m}
            for scheme, stack in layers.items():
                for layer in stack:  # warm-up
                    layer(x)
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    for layer in stack:
                        layer(x)
                    best = min(best, (time.perf_counter() - start) / len(stack))
                row[f"{scheme}_ms"] = best * 1e3
            for scheme in schemes:
                row[f"{scheme}_speedup"] = row["bf16_ms"] / row[f"{scheme}_ms"]
            rows.append(row)
    return rows


# -------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> QuantBenchReport:
    from effinfer.bench.workload import random_prompt

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        raise BenchError(f"unknown scheme(s) {unknown}; choose from {', '.join(SCHEMES)}")
    if schemes[0] != "bf16":
        schemes = ["bf16", *[s for s in schemes if s != "bf16"]]  # the baseline every ratio divides by
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    config = ModelConfig.from_dir(args.model)
    import random

    prompt = random_prompt(random.Random(args.seed), args.prompt_len, config.vocab_size)
    runners: list = []
    log = print if not args.no_progress else (lambda *a, **k: None)
    for scheme in schemes:
        log(f"[effinfer {scheme}] loading {args.model}", file=sys.stderr, flush=True)
        dtype = "bfloat16" if args.dtype == "auto" else args.dtype
        runners.append(_EffinferDecode(f"effinfer {scheme}", args.model, SCHEMES[scheme], dtype, threads))
    workdir = None
    if args.llama_cpp:
        workdir = tempfile.TemporaryDirectory(prefix="effinfer-bench-gguf-")
        log("[llama.cpp] converting to GGUF and quantizing to Q8_0 / Q4_0", file=sys.stderr, flush=True)
        files = _llama_cpp_files(Path(args.model), Path(workdir.name))
        n_ctx = args.prompt_len + args.decode_tokens + 8
        for qtype, path in files.items():
            runners.append(_LlamaCppDecode(f"llama.cpp {qtype}", path, threads, n_ctx))
            runners.append(_EffinferDecode(f"effinfer GGUF {qtype}", str(path), None, "bfloat16", threads))
    results = [VariantResult(r.name, r.engine, r.weights, r.weight_bytes) for r in runners]
    for runner in runners:  # warm-up
        runner.decode(prompt, min(8, args.decode_tokens))
    for round_index in range(args.rounds):
        for runner, result in zip(runners, results):
            log(f"round {round_index + 1}/{args.rounds}: {runner.name}", file=sys.stderr, flush=True)
            result.tokens_per_s.append(runner.decode(prompt, args.decode_tokens))
    del runners
    gc.collect()
    if workdir is not None:
        workdir.cleanup()
    table: list[dict] = []
    if args.layer_table:
        layer_schemes = tuple(s for s in schemes if s in LAYER_SCHEMES) or ("int8", "int4")
        # TinyLlama's four projections; copies so each stack is ~350 MB of bf16 and streams from memory.
        for in_features, out_features in LAYER_SHAPES:
            copies = max(8, int(350e6 // (2 * in_features * out_features)))
            log(
                f"timing a {in_features}→{out_features} layer at batch sizes 1..64",
                file=sys.stderr,
                flush=True,
            )
            table += layer_table(in_features, out_features, copies, schemes=layer_schemes)
    return QuantBenchReport(
        command=args.command_line,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_info(torch.device("cpu"), threads),
        model=str(Path(args.model).resolve()),
        decode_tokens=args.decode_tokens,
        prompt_tokens=len(prompt),
        rounds=args.rounds,
        variants=results,
        layer_table=table,
    )


def render_markdown(report: QuantBenchReport) -> str:
    base = report.baseline()
    lines = [
        f"Command: `{report.command}`  ",
        f"Date: {report.date}; machine: {report.machine['cpu']}, {report.machine['threads']} threads, "
        f"torch {report.machine['torch']}  ",
        f"Batch-1 decode of {report.decode_tokens} tokens after a {report.prompt_tokens}-token prompt, "
        f"best of {report.rounds} interleaved rounds.",
        "",
        "| engine | weights | weight MB read per token | tokens/s | ms/token | × effinfer bf16 | GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for v in report.variants:
        tps = v.best_tokens_per_s
        lines.append(
            f"| {v.engine} | {v.name.removeprefix(v.engine).strip()} | {v.weight_bytes / 1e6:,.0f} | {tps:.2f} | "
            f"{1e3 / tps:.1f} | {tps / base.best_tokens_per_s:.2f} | {v.weight_bytes * tps / 1e9:.1f} |"
        )
    if report.layer_table:
        schemes = [k.removesuffix("_speedup") for k in report.layer_table[0] if k.endswith("_speedup")]
        lines += [
            "",
            "One Linear layer per TinyLlama projection (in→out), weights streamed from memory, ms per call:",
            "",
            "| layer | batch | bf16 | " + " | ".join(f"{s} | {s} × bf16" for s in schemes) + " |",
            "|---|---:|---:|" + "---:|---:|" * len(schemes),
        ]
        for row in report.layer_table:
            cells = " | ".join(f"{row[f'{s}_ms']:.3f} | {row[f'{s}_speedup']:.2f}" for s in schemes)
            lines.append(f"| {row.get('shape', '')} | {row['batch']} | {row['bf16_ms']:.3f} | {cells} |")
        worst = {s: min(row[f"{s}_speedup"] for row in report.layer_table) for s in schemes}
        lines.append("")
        lines.append(
            "Slowest quantized layer relative to bf16: "
            + ", ".join(f"{s} {v:.2f}×" for s, v in worst.items())
        )
    return "\n".join(lines) + "\n"


def write_plot(report: QuantBenchReport, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return False
    names = [v.name for v in report.variants]
    values = [v.best_tokens_per_s for v in report.variants]
    colors = ["tab:blue" if v.engine == "effinfer" else "tab:orange" for v in report.variants]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    ax.set_xlabel("batch-1 decode tokens/s (higher is better)")
    ax.set_title(f"Weight quantization, {Path(report.model).name}")
    for i, value in enumerate(values[::-1]):
        ax.text(value, i, f" {value:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="float HF model directory")
    parser.add_argument("--schemes", default="bf16,int8,int4", help=f"comma-separated: {', '.join(SCHEMES)}")
    parser.add_argument("--dtype", default="auto", help="activation dtype (default bfloat16)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: usable cores)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens timed per round")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument(
        "--llama-cpp", action="store_true", help="add llama.cpp Q8_0 / Q4_0 on the same weights"
    )
    parser.add_argument("--layer-table", action="store_true", help="time one layer at batch sizes 1..64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", metavar="FILE", help="append the tables to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart of tokens/s")
    parser.add_argument("--no-progress", action="store_true")


def _check_arguments(args: argparse.Namespace) -> None:
    for flag in ("decode_tokens", "prompt_len", "rounds", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def register(subparsers) -> None:
    """Adds ``quant`` to the ``effinfer bench`` actions."""
    description = __doc__.splitlines()[0].replace("``", "")
    parser = subparsers.add_parser("quant", help="decode speed and weight memory per quantization scheme",
                                   description=description)  # fmt: skip
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("effinfer bench quant: error: --llama-cpp needs llama-cpp-python", file=sys.stderr)
            return 2
    try:
        _check_arguments(args)
        report = run(args)
    except (BenchError, ConfigError) as e:
        print(f"effinfer bench quant: error: {e}", file=sys.stderr)
        return 2
    text = render_markdown(report)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    if args.json:
        payload = asdict(report)
        Path(args.json).write_text(json.dumps(payload, indent=2))
    if args.plot and write_plot(report, args.plot):
        print(f"wrote {args.plot}")
    return 0
