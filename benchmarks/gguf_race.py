"""effinfer vs llama.cpp on the same GGUF file: batch-1 decode, 512-token prefill, resident memory.

llama.cpp runs through llama-cpp-python (the same ggml engine ``llama-bench`` times), both with
the same thread count, in one process and interleaved (effinfer, llama.cpp, effinfer, ...) so a
shared machine's load hits both alike; the best of ``--repeats`` rounds is kept for each.
Decode: ``--decode-tokens`` greedy tokens after a short prompt, end-of-sequence banned (as
llama-bench's tg). Prefill: a fresh random ``--prefill-tokens`` prompt each round (no prefix cache
hit), one output token. Memory: growth of the process's resident set while each engine loads and
runs, next to the file size.

Run: ``python benchmarks/gguf_race.py FILE.gguf [FILE.gguf ...] [--threads 2] [--markdown out.md]``
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Effinfer:
    name = "effinfer"

    def __init__(self, path: Path, threads: int) -> None:
        self.llm = LLM(str(path), dtype="bfloat16", num_threads=threads, max_num_seqs=1,
                       max_model_len=1024, enable_prefix_caching=False, kv_cache_memory=64 << 20,
                       show_progress=True)  # fmt: skip

    def decode(self, prompt: list[int], tokens: int) -> float:
        engine = self.llm.engine
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
        stamps = []
        while engine.has_unfinished_requests():
            engine.step()
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def prefill(self, prompt: list[int]) -> float:
        start = time.perf_counter()
        self.llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        return len(prompt) / (time.perf_counter() - start)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, seed=0, verbose=False)  # fmt: skip

    def decode(self, prompt: list[int], tokens: int) -> float:
        self.llm.reset()
        eos = self.llm.token_eos()

        def ban_eos(_ids, scores):
            scores[eos] = -float("inf")
            return scores

        stamps = []
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                   logits_processor=[ban_eos]):  # fmt: skip
            stamps.append(time.perf_counter())
            if len(stamps) == tokens + 1:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - start)


def race(path: Path, args: argparse.Namespace) -> dict:
    engines, memory = [], {}
    for cls in (Effinfer, LlamaCpp):
        gc.collect()
        before = rss_bytes()
        engine = cls(path, args.threads)
        engine.decode([1, 2, 3, 4], 4)  # warm-up (kernel JIT, first-touch of mapped pages)
        memory[cls.name] = rss_bytes() - before
        engines.append(engine)
    rng = random.Random(0)
    vocab = 1000
    best = {(e.name, kind): 0.0 for e in engines for kind in ("decode", "prefill")}
    prompt = [rng.randrange(10, vocab) for _ in range(16)]
    for _ in range(args.repeats):
        for engine in engines:
            best[engine.name, "decode"] = max(
                best[engine.name, "decode"], engine.decode(prompt, args.decode_tokens)
            )
            long_prompt = [rng.randrange(10, vocab) for _ in range(args.prefill_tokens)]
            best[engine.name, "prefill"] = max(best[engine.name, "prefill"], engine.prefill(long_prompt))
    del engines
    gc.collect()
    return {"file": path.name, "file_bytes": path.stat().st_size, "memory": memory, "best": best}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"| file | llama.cpp decode (tg{args.decode_tokens}) | effinfer decode | ratio | llama.cpp prefill "
        f"(pp{args.prefill_tokens}) | effinfer prefill | ratio | file | effinfer RSS | llama.cpp RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b, m, mb = r["best"], r["memory"], 1 << 20
        ed, ld, ep, lp = (
            b["effinfer", "decode"],
            b["llama.cpp", "decode"],
            b["effinfer", "prefill"],
            b["llama.cpp", "prefill"],
        )
        lines.append(
            f"| {r['file']} | {ld:.1f} | {ed:.1f} | {ed / ld:.2f}x | {lp:.0f} | {ep:.0f} | {ep / lp:.1f}x "
            f"| {r['file_bytes'] / mb:.0f} MiB | {m['effinfer'] / mb:.0f} MiB ({m['effinfer'] / r['file_bytes']:.2f}x) "
            f"| {m['llama.cpp'] / mb:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results = []
    for path in args.files:
        results.append(race(path, args))
        print(markdown(results[-1:], args), flush=True)
    table = markdown(results, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
