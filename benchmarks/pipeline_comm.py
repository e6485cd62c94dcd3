"""Bytes that pipeline parallelism moves per token: hidden states between stages, logits to the driver.

Runs a greedy batch through ``LLM(model, pipeline_parallel_size=M)`` on the CPU (gloo) and reads
the driver's counters (``engine/pipeline.py``): the hidden states stage 0 sends to stage 1 (every
stage boundary carries the same amount: one hidden vector per token that runs) and the logits the
last stage sends back for each sampled row. Prefix caching is off, so every prompt token runs.
A count of bytes, not a timing: it does not depend on the machine's load.

    python benchmarks/pipeline_comm.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from effinfer import LLM, SamplingParams
from effinfer.engine.pipeline import pipeline_bytes, reset_pipeline_bytes

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Hello",
]


def measure(model: str, pp: int, tp: int, max_tokens: int, dtype: str) -> dict:
    llm = LLM(
        model,
        pipeline_parallel_size=pp,
        tensor_parallel_size=tp,
        device="cpu",
        dtype=dtype,
        enable_prefix_caching=False,
        show_progress=False,
    )
    try:
        reset_pipeline_bytes()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate(PROMPTS, params)
        moved = pipeline_bytes()
        config = llm.engine.model_config
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        # Every prompt token runs once; every generated token but the last is fed back once.
        run_tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)
        return {
            "model": Path(model).name,
            "pipeline_parallel_size": pp,
            "tensor_parallel_size": tp,
            "dtype": str(llm.engine.dtype).removeprefix("torch."),
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "tokens_run": run_tokens,
            "tokens_generated": generated,
            "hidden_bytes_per_token_per_boundary": moved.get("hidden_sent", 0) / run_tokens,
            "logits_bytes_per_generated_token": moved.get("logits_received", 0) / generated,
            "stage_boundaries": pp - 1,
        }
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pipeline-parallel-size", type=int, default=2)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = measure(
        str(Path(args.model).expanduser()),
        args.pipeline_parallel_size,
        args.tensor_parallel_size,
        args.max_tokens,
        args.dtype,
    )
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
