"""Inter-token latency of running streams while long prompts arrive, with and without chunked prefill.

A few streams decode; after they are warm, long prompts (default 2,048 tokens) join one at a time.
Without chunking each long prompt's prefill is a step of its own and every running stream waits
for it; with ``enable_chunked_prefill`` the prompt is cut into ``max_num_batched_tokens`` chunks
that share steps with the decodes. Prints the p50 / p99 / max gap between two tokens of the
running streams, and the time to first token of the long prompts, for both settings.
Run: ``python benchmarks/chunked_prefill_itl.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf``
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from effinfer import LLMEngine, SamplingParams
from effinfer.config import EngineConfig


def percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q)) if values else 0.0


def run(model: str, chunked: bool, args) -> dict:
    config = EngineConfig(
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=args.budget if chunked else None,
        num_threads=args.threads,
        show_progress=False,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(model, config)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size

    def random_prompt(n):
        return torch.randint(100, vocab - 100, (n,), generator=gen).tolist()

    stream_params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for i in range(args.streams):
        engine.add_request(random_prompt(32), stream_params, f"stream{i}")
    last_token_at: dict[str, float] = {}
    gaps: list[float] = []
    long_sent: dict[str, float] = {}
    ttft: list[float] = []
    warm_steps, steps, tail_steps = 5, 0, 0
    while True:
        # The next long prompt arrives once the previous one has its first token.
        if steps >= warm_steps and len(long_sent) < args.long_prompts and len(ttft) == len(long_sent):
            request_id = f"long{len(long_sent)}"
            engine.add_request(random_prompt(args.long_len), SamplingParams(max_tokens=1), request_id)
            long_sent[request_id] = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            if out.request_id.startswith("stream"):
                if steps > warm_steps and out.request_id in last_token_at:
                    gaps.append(now - last_token_at[out.request_id])
                last_token_at[out.request_id] = now
            elif out.finished:
                ttft.append(now - long_sent[out.request_id])
        if len(ttft) == args.long_prompts:
            tail_steps += 1
            if tail_steps > 3:  # the streams' next tokens close the gap the last prompt opened
                break
    for i in range(args.streams):
        engine.abort_request(f"stream{i}")
    return {
        "chunked_prefill": chunked,
        "budget": args.budget if chunked else None,
        "itl_p50_ms": percentile(gaps, 0.5) * 1e3,
        "itl_p99_ms": percentile(gaps, 0.99) * 1e3,
        "itl_max_ms": max(gaps) * 1e3,
        "long_prompt_ttft_s": sum(ttft) / len(ttft),
        "stream_tokens": len(gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--long-prompts", type=int, default=2)
    parser.add_argument("--long-len", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=256, help="max_num_batched_tokens with chunking")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    for chunked in (False, True):
        print(json.dumps(run(args.model, chunked, args)), flush=True)


if __name__ == "__main__":
    main()
