"""Inter-token latency through the server, with and without chunked prefill, measured by `effinfer bench serve`.

Short streaming requests arrive at a steady rate and a few long prompts (about 2k tokens) arrive
among them. For each setting this starts `effinfer serve` on a free loopback port, runs
`effinfer bench serve` against it with the same prompts and arrival times, and reads the ITL
(gap between two streamed chunks of a request) percentiles from its JSON report. Without chunking
every long prefill is a step of its own that all running streams wait for; with
`--enable-chunked-prefill` it is cut into `--max-num-batched-tokens` chunks that share steps with
the decodes, so the ITL tail shrinks.
Run: ``python benchmarks/chunked_prefill_serve.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf``
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_prompts(path: Path, num_short: int, num_long: int, long_words: int, seed: int) -> None:
    """One JSONL prompt per line: short ones with the long ones spread among them."""
    words = TEXT.read_text(encoding="utf-8").split()
    rng = random.Random(seed)

    def passage(n: int) -> str:
        start = rng.randrange(0, len(words) - n)
        return " ".join(words[start : start + n])

    prompts = [passage(24) for _ in range(num_short)]
    for i in range(num_long):
        prompts.insert((i + 1) * len(prompts) // (num_long + 1), passage(long_words))
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("the server did not come up")


def run(label: str, engine_flags: list[str], prompts: Path, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "effinfer.cli", "serve", "--model", args.model, "--port", str(port),
         "--threads", str(args.threads), "--no-prefix-caching", "--no-access-log", *engine_flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_healthy(url, server)
        with tempfile.NamedTemporaryFile(suffix=".json") as report:
            subprocess.run(
                [sys.executable, "-m", "effinfer.cli", "bench", "serve", "--url", url, "--prompts", str(prompts),
                 "--num-prompts", str(args.num_short + args.num_long), "--rate", str(args.rate),
                 "--max-tokens", str(args.max_tokens), "--min-tokens", str(args.max_tokens),
                 "--seed", "0", "--label", label, "--json", report.name],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            return json.loads(Path(report.name).read_text())
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-short", type=int, default=24)
    parser.add_argument("--num-long", type=int, default=2)
    parser.add_argument("--long-words", type=int, default=1500, help="words per long prompt (~2k tokens)")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--budget", type=int, default=256, help="--max-num-batched-tokens when chunking")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, args.num_short, args.num_long, args.long_words, seed=0)
        settings = {
            "whole-prompt prefill (default)": [],
            f"--enable-chunked-prefill --max-num-batched-tokens {args.budget}": [
                "--enable-chunked-prefill", "--max-num-batched-tokens", str(args.budget),
            ],
        }  # fmt: skip
        results = {label: run(label, flags, prompts, args) for label, flags in settings.items()}
    print(
        "| scheduling | completed | ITL p50 (ms) | ITL p90 (ms) | ITL p99 (ms) | TTFT p99 (ms) | output tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, report in results.items():
        itl, ttft = report["itl_ms"], report["ttft_ms"]
        print(
            f"| {label} | {report['completed']}/{report['completed'] + report['failed']} | {itl['p50']:.0f} "
            f"| {itl['p90']:.0f} | {itl['p99']:.0f} | {ttft['p99']:.0f} | {report['output_throughput']:.1f} |"
        )


if __name__ == "__main__":
    main()
