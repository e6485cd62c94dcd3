"""``effinfer bench gguf``: the CPU race against llama.cpp's own tools on one GGUF file.

    effinfer bench gguf --model FILE.gguf [--llama-bench PATH] [--llama-server PATH] [--threads 2]
                        [--decode-tokens 64] [--prefill-tokens 512] [--repetitions 3]
                        [--concurrent 16] [--markdown FILE] [--json FILE] [--plot FILE.png]

Three measurements, each next to llama.cpp's on the same file and thread count:
- batch-1 decode (``tg64``) and prefill (``pp512``): ``llama-bench -p 512 -n 64 -r R -o json``
  against effinfer in a child process timing the same shapes (decode: the tokens after a short
  prompt, end-of-sequence ignored; prefill: a fresh random 512-token prompt, one output token),
  mean and standard deviation of R repetitions after a warm-up, as llama-bench reports them;
- serving: ``effinfer bench serve`` sends C streamed requests at once (rate inf, C in flight, 2C
  in all, ``ignore_eos``) first to ``effinfer serve``, then to ``llama-server -np C`` (C slots
  decoding in one batch); output tokens/s;
- memory: each process's peak resident set (``VmHWM`` / ``ru_maxrss``), and effinfer's resident
  weight bytes by kind (``loading/memory.py``) next to the file's size.

llama.cpp's tools are built by ``benchmarks/build_llama_cpp.sh`` (cached under
~/.cache/effinfer-llama.cpp); they are looked up there and on PATH when not given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from effinfer.bench.suite import BenchError

LLAMA_CPP_CACHE = Path(
    os.environ.get("EFFINFER_LLAMA_CPP_CACHE", Path.home() / ".cache" / "effinfer-llama.cpp")
)
BUILD_HINT = "build it with `bash benchmarks/build_llama_cpp.sh`"
SERVER_START_SECONDS = 300


# -------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="FILE.gguf", help="the GGUF file both engines run")
    parser.add_argument(
        "--llama-bench", metavar="PATH", help="llama.cpp's llama-bench (default: PATH, build cache)"
    )
    parser.add_argument(
        "--llama-server", metavar="PATH", help="llama.cpp's llama-server (default: PATH, build cache)"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    parser.add_argument(
        "--decode-tokens", type=int, default=64, help="batch-1 decode tokens, tg (default 64)"
    )
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens, pp (default 512)")
    parser.add_argument("--repetitions", type=int, default=3, help="timed repetitions of each (default 3)")
    parser.add_argument(
        "--concurrent",
        type=int,
        default=16,
        help="streams in flight against each server; 0 skips serving (default 16)",
    )
    parser.add_argument(
        "--serve-output-tokens", type=int, default=64, help="tokens per served request (default 64)"
    )
    parser.add_argument(
        "--serve-input-words", type=int, default=32, help="words per served prompt (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", metavar="FILE", help="append the results section to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="bar chart of the ratios and memory (needs matplotlib)"
    )


def register(subparsers) -> None:
    """Adds ``gguf`` to the ``effinfer bench`` actions."""
    parser = subparsers.add_parser(
        "gguf", help="decode, prefill, serving and memory against llama.cpp on a GGUF file",
        description=__doc__.splitlines()[0].replace("``", ""),
    )  # fmt: skip
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def find_tool(name: str, given: str | None) -> str:
    """The path of llama.cpp tool ``name``: ``given``, else on PATH, else in the build cache; BenchError if none."""
    if given is not None:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BenchError(f"--{name} {given} is not an executable file; {BUILD_HINT}")
        return str(path)
    found = shutil.which(name) or next(
        (str(p) for p in sorted(LLAMA_CPP_CACHE.glob(f"build-*/bin/{name}")) if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise BenchError(
            f"{name} not found on PATH nor in {LLAMA_CPP_CACHE}; {BUILD_HINT}, or pass --{name} PATH"
        )
    return found


def check_arguments(args: argparse.Namespace) -> tuple[str, str | None]:
    """Fail early, with one line, on a bad file, count or missing tool; returns (llama-bench, llama-server)."""
    from effinfer.loading.gguf import is_gguf_file

    model = Path(args.model).expanduser()
    if not model.is_file():
        raise BenchError(f"no file at {args.model}")
    if not is_gguf_file(model):
        raise BenchError(f"{args.model} is not a GGUF file")
    for flag in ("threads", "decode_tokens", "prefill_tokens", "repetitions", "serve_output_tokens"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.concurrent < 0:
        raise BenchError(f"--concurrent must be 0 or more, got {args.concurrent}")
    bench = find_tool("llama-bench", args.llama_bench)
    server = find_tool("llama-server", args.llama_server) if args.concurrent else None
    return bench, server


# -------------------------------------------------------------------- batch 1: llama-bench and effinfer


def _run_measured(command: list[str], stdout) -> int:
    """Run ``command`` to its end, stdout to the file ``stdout``; the peak resident bytes of the process."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(
            proc.pid, 0
        )  # wait4: the child's own peak RSS, not the sum of all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            stderr.seek(0)
            err = stderr.read().decode(errors="replace").strip()
            raise BenchError(f"{Path(command[0]).name} failed ({proc.returncode}): {err[-400:]}")
    return usage.ru_maxrss * 1024  # KiB on Linux


def llama_bench(tool: str, args: argparse.Namespace) -> dict:
    """pp / tg tokens/s (mean, sd) and peak RSS of ``llama-bench`` on the file."""
    command = [tool, "-m", str(Path(args.model).expanduser()), "-t", str(args.threads), "-p", str(args.prefill_tokens),
               "-n", str(args.decode_tokens), "-r", str(args.repetitions), "-o", "json"]  # fmt: skip
    with tempfile.TemporaryFile() as out:
        peak = _run_measured(command, out)
        out.seek(0)
        text = out.read().decode(errors="replace")
    try:
        rows = json.loads(text[text.index("[") :])
    except ValueError:
        raise BenchError(f"llama-bench printed no JSON results: {text[-300:]!r}") from None
    result = {
        "command": " ".join(command),
        "peak_rss": peak,
        "build": rows[0].get("build_commit") if rows else None,
    }
    for row in rows:
        kind = "prefill" if row.get("n_prompt", 0) and not row.get("n_gen", 0) else "decode"
        result[kind] = {"mean": float(row["avg_ts"]), "sd": float(row.get("stddev_ts", 0.0))}
    if "prefill" not in result or "decode" not in result:
        raise BenchError(f"llama-bench did not report both pp and tg: {rows}")
    return result


def effinfer_batch1(args: argparse.Namespace) -> dict:
    """The same shapes on effinfer, in a child process (its own peak RSS, no llama.cpp in it)."""
    settings = {
        "model": str(Path(args.model).expanduser()), "threads": args.threads, "decode_tokens": args.decode_tokens,
        "prefill_tokens": args.prefill_tokens, "repetitions": args.repetitions, "seed": args.seed,
    }  # fmt: skip
    with tempfile.TemporaryFile() as out:
        peak = _run_measured([sys.executable, "-m", "effinfer.bench.gguf", json.dumps(settings)], out)
        out.seek(0)
        lines = out.read().decode().strip().splitlines()
    result = json.loads(lines[-1])
    result["peak_rss"] = peak
    return result


def kv_cache_bytes(model: str, tokens: int) -> int:
    """A bf16 KV budget for ``tokens`` tokens (plus a little for block rounding), as llama.cpp sizes its context.

    effinfer's default budget is a share of free memory, zero-filled and so resident: far more
    than a short benchmark needs, and unfair in the memory column.
    """
    from effinfer.loading.gguf import GGUFFile

    config = GGUFFile(model).model_config()
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    return per_token * (tokens + 256)


def _mean_sd(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "runs": values}


def worker(settings: dict) -> dict:
    """Runs in the child: load, warm up, time decode and prefill; the weights' memory by kind."""
    import torch

    from effinfer.bench.throughput import EffinferRunner
    from effinfer.bench.workload import random_prompt
    from effinfer.loading.memory import memory_accounting, rss_bytes
    from effinfer.sampling_params import SamplingParams

    torch.set_num_threads(settings["threads"])
    context = settings["prefill_tokens"] + settings["decode_tokens"] + 16
    start = time.perf_counter()
    runner = EffinferRunner(settings["model"], dtype="bfloat16", num_threads=settings["threads"], max_num_seqs=1,
                            max_model_len=context, kv_cache_memory=kv_cache_bytes(settings["model"], context),
                            enable_prefix_caching=False, show_progress=False)  # fmt: skip
    load_s = time.perf_counter() - start
    rss_after_load = rss_bytes()
    accounting = memory_accounting(runner.engine.model)
    vocab = runner.engine.model.config.vocab_size
    rng = random.Random(settings["seed"])
    short = random_prompt(rng, 4, vocab)

    def prefill() -> float:
        prompt = random_prompt(rng, settings["prefill_tokens"], vocab)
        begin = time.perf_counter()
        runner.llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        return settings["prefill_tokens"] / (time.perf_counter() - begin)

    runner.decode(short, 8)  # warm-up: kernel build or load, first touch of every weight
    prefill()
    reps = range(settings["repetitions"])
    decode = [runner.decode(short, settings["decode_tokens"]).tokens_per_s for _ in reps]
    prefills = [prefill() for _ in reps]
    return {
        "decode": _mean_sd(decode),
        "prefill": _mean_sd(prefills),
        "load_s": load_s,
        "rss_after_load": rss_after_load,
        "weights": {
            "owned": accounting.owned_bytes,
            "mapped": accounting.mapped_bytes,
            "by_kind": accounting.owned,
        },
    }


# -------------------------------------------------------------------- serving: effinfer serve and llama-server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, name: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited ({proc.returncode}) before serving: {log.read_text()[-400:].strip()}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise BenchError(f"{name} did not answer /health within {SERVER_START_SECONDS} s")


def _serve_load(url: str, label: str, args: argparse.Namespace) -> dict:
    from effinfer.bench import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    load = parser.parse_args([
        "--url", url, "--label", label, "--rate", "inf", "--num-prompts", str(2 * args.concurrent),
        "--max-concurrency", str(args.concurrent), "--max-tokens", str(args.serve_output_tokens),
        "--input-words", str(args.serve_input_words), "--ignore-eos", "--seed", str(args.seed),
    ])  # fmt: skip
    return asyncio.run(serve.run(load))


def serve_race(name: str, command: list[str], port: int, args: argparse.Namespace) -> dict:
    """Start a server, load it with C concurrent streams, read its peak RSS, stop it."""
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(prefix="effinfer-bench-gguf-", suffix=".log") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(proc, url, name, Path(log.name))
            report = _serve_load(f"{url}/v1", name, args)
            from effinfer.loading.memory import rss_bytes

            peak = rss_bytes(proc.pid, "VmHWM")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if report["failed"]:
        raise BenchError(f"{name}: {report['failed']} requests failed: {'; '.join(report['errors'])}")
    return {"command": " ".join(command), "peak_rss": peak, "report": report}


def serving(server_tool: str, args: argparse.Namespace) -> dict:
    model = str(Path(args.model).expanduser())
    per_stream = 256  # context tokens per stream: prompt (~45) + output, with room
    while per_stream < args.serve_input_words * 2 + args.serve_output_tokens + 16:
        per_stream *= 2
    kv_bytes = kv_cache_bytes(model, per_stream * args.concurrent)  # the KV room of llama-server's -c
    port = _free_port()
    ours = [sys.executable, "-m", "effinfer.cli", "serve", "--model", model, "--port", str(port), "--threads",
            str(args.threads), "--max-num-seqs", str(args.concurrent), "--max-model-len", str(per_stream),
            "--kv-cache-memory", str(kv_bytes), "--no-access-log", "--dtype", "bfloat16"]  # fmt: skip
    result = {"effinfer": serve_race("effinfer serve", ours, port, args)}
    port = _free_port()
    theirs = [server_tool, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
              "-tb", str(args.threads), "-np", str(args.concurrent), "-c", str(per_stream * args.concurrent)]  # fmt: skip
    result["llama.cpp"] = serve_race(f"llama-server -np {args.concurrent}", theirs, port, args)
    return result


# -------------------------------------------------------------------- the run and its report


def run(args: argparse.Namespace) -> dict:
    from effinfer.bench.report import cpu_model

    bench_tool, server_tool = check_arguments(args)
    model = Path(args.model).expanduser()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"[1/3] llama-bench pp{args.prefill_tokens} / tg{args.decode_tokens} on {model.name}")
    theirs = llama_bench(bench_tool, args)
    log("[2/3] effinfer, the same shapes")
    ours = effinfer_batch1(args)
    served = None
    if args.concurrent:
        log(
            f"[3/3] {args.concurrent} concurrent streams: effinfer serve, then llama-server -np {args.concurrent}"
        )
        served = serving(server_tool, args)
    return {
        "command": getattr(args, "command_line", ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs usable, {args.threads} threads per engine",
        "file": model.name,
        "file_bytes": model.stat().st_size,
        "settings": {
            k: getattr(args, k)
            for k in (
                "threads",
                "decode_tokens",
                "prefill_tokens",
                "repetitions",
                "concurrent",
                "serve_output_tokens",
                "serve_input_words",
            )
        },  # fmt: skip
        "llama.cpp": theirs,
        "effinfer": ours,
        "serving": served,
    }


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def render_markdown(result: dict) -> str:
    s, ours, theirs, mib = result["settings"], result["effinfer"], result["llama.cpp"], 1 << 20
    lines = [
        "",
        f"### effinfer vs llama.cpp on {result['file']} ({result['file_bytes'] / mib:.0f} MiB)",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; machine: {result['machine']}",
        f"- llama.cpp: `{theirs['command']}` (build {theirs.get('build')})",
        "",
        "| measurement | llama.cpp | effinfer | effinfer / llama.cpp |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in (("decode", f"batch-1 decode, tg{s['decode_tokens']} (tok/s)"),
                        ("prefill", f"prefill, pp{s['prefill_tokens']} (tok/s)")):  # fmt: skip
        a, b = theirs[kind], ours[kind]
        lines.append(
            f"| {label} | {a['mean']:.1f} ± {a['sd']:.1f} | {b['mean']:.1f} ± {b['sd']:.1f} | {_ratio(b['mean'], a['mean'])} |"
        )
    if result["serving"]:
        a, b = (result["serving"][k]["report"] for k in ("llama.cpp", "effinfer"))
        lines.append(
            f"| {s['concurrent']} concurrent streams, output (tok/s) | {a['output_throughput']:.1f} "
            f"| {b['output_throughput']:.1f} | {_ratio(b['output_throughput'], a['output_throughput'])} |"
        )
    lines.append(
        f"| peak RSS, batch-1 process (MiB) | {theirs['peak_rss'] / mib:.0f} | {ours['peak_rss'] / mib:.0f} "
        f"| {_ratio(ours['peak_rss'], theirs['peak_rss'])} |"
    )
    if result["serving"]:
        a, b = (result["serving"][k]["peak_rss"] for k in ("llama.cpp", "effinfer"))
        lines.append(f"| peak RSS, server (MiB) | {a / mib:.0f} | {b / mib:.0f} | {_ratio(b, a)} |")
    w = ours["weights"]
    lines += [
        "",
        f"effinfer's resident weights: {w['owned'] / mib:.1f} MiB allocated ({w['owned'] / result['file_bytes']:.2f}x "
        f"the file) + {w['mapped'] / mib:.1f} MiB on the file's map (resident only where read).",
    ]
    return "\n".join(lines) + "\n"


def write_plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return False
    ours, theirs, s = result["effinfer"], result["llama.cpp"], result["settings"]
    names = [f"decode tg{s['decode_tokens']}", f"prefill pp{s['prefill_tokens']}"]
    ratios = [
        ours["decode"]["mean"] / theirs["decode"]["mean"],
        ours["prefill"]["mean"] / theirs["prefill"]["mean"],
    ]
    if result["serving"]:
        a, b = (result["serving"][k]["report"]["output_throughput"] for k in ("llama.cpp", "effinfer"))
        names.append(f"{s['concurrent']} streams")
        ratios.append(b / a)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    speed.bar(names, ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
    speed.axhline(1.0, color="black", linewidth=1)
    speed.set_ylabel("effinfer / llama.cpp (tokens/s)")
    for i, r in enumerate(ratios):
        speed.text(i, r, f"{r:.2f}x", ha="center", va="bottom")
    mib = 1 << 20
    labels, a, b = ["batch-1"], [theirs["peak_rss"] / mib], [ours["peak_rss"] / mib]
    if result["serving"]:
        labels.append("server")
        a.append(result["serving"]["llama.cpp"]["peak_rss"] / mib)
        b.append(result["serving"]["effinfer"]["peak_rss"] / mib)
    x = range(len(labels))
    memory.bar([i - 0.2 for i in x], a, width=0.4, label="llama.cpp", color="tab:orange")
    memory.bar([i + 0.2 for i in x], b, width=0.4, label="effinfer", color="tab:blue")
    memory.axhline(result["file_bytes"] / mib, color="gray", linestyle="--", label="file size")
    memory.set_xticks(list(x), labels)
    memory.set_ylabel("peak RSS (MiB)")
    memory.legend()
    fig.suptitle(f"{result['file']}, {s['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_command(args: argparse.Namespace) -> int:
    from effinfer.config import ConfigError

    try:
        result = run(args)
    except (BenchError, ConfigError) as e:
        print(f"effinfer bench gguf: error: {e}", file=sys.stderr)
        return 2
    text = render_markdown(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot and write_plot(result, args.plot):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":  # the effinfer side of the batch-1 race, in its own process (``effinfer_batch1``)
    print(json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
