"""Batch-1 decode with and without speculative decoding, on a code-editing chat request.

The model is asked to rename a variable in a piece of code it was given, so its answer repeats
most of the prompt: the case prompt lookup is made for. Prints decode tokens/s of plain and
speculative decoding, their ratio, the acceptance rate and the mean accepted length, and checks
that greedy speculation returned exactly the plain tokens. Decode time runs from the first
token (the prefill's) to the last.
Run: ``python benchmarks/spec_decode.py --model QWEN_0.5B.gguf --speculative-model ngram``
(or ``--speculative-model QWEN_0.5B.gguf`` with ``--model QWEN_1.5B.gguf`` for a draft model).
"""

from __future__ import annotations

import argparse
import json
import time

from effinfer import LLM, SamplingParams

CODE = """def summarize(values):
    total = 0
    count = 0
    smallest = None
    largest = None
    for x in values:
        total += x
        count += 1
        if smallest is None or x < smallest:
            smallest = x
        if largest is None or x > largest:
            largest = x
    mean = total / count if count else 0.0
    return {"total": total, "count": count, "mean": mean, "min": smallest, "max": largest}


def format_summary(summary):
    lines = []
    for key in ("total", "count", "mean", "min", "max"):
        lines.append(f"{key:>6}: {summary[key]}")
    return "\\n".join(lines)
"""
REQUEST = f"Rename the loop variable `x` to `value` in this code. Reply with the whole code only.\n\n{CODE}"


def timed_generate(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and the decode time: from the first token (the prefill's) to the last."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    first_token_at = None
    for out in llm.stream(prompt, params):
        if first_token_at is None and out.outputs[0].token_ids:
            first_token_at = time.perf_counter()
    return out.outputs[0].token_ids, time.perf_counter() - first_token_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--speculative-model", default="ngram")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    common = dict(num_threads=args.threads, max_num_seqs=1, show_progress=False)
    plain = LLM(args.model, **common)
    prompt = plain.tokenizer.encode(
        plain.tokenizer.apply_chat_template(
            [{"role": "user", "content": REQUEST}], add_generation_prompt=True
        ),
        add_special_tokens=False,
    )
    timed_generate(plain, prompt[:32], 8)  # warm-up: kernels built, caches touched
    plain_tokens, plain_s = timed_generate(plain, prompt, args.max_tokens)
    del plain

    spec = LLM(
        args.model,
        speculative_model=args.speculative_model,
        num_speculative_tokens=args.num_speculative_tokens,
        **common,
    )
    timed_generate(spec, prompt[:32], 8)
    before = spec.engine.stats()
    spec_tokens, spec_s = timed_generate(spec, prompt, args.max_tokens)
    after = spec.engine.stats()
    drafts = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    verify_steps = after.num_verify_steps - before.num_verify_steps
    decode = len(plain_tokens) - 1
    result = {
        "prompt_tokens": len(prompt),
        "output_tokens": len(plain_tokens),
        "plain_decode_tokens_per_s": decode / plain_s,
        "spec_decode_tokens_per_s": decode / spec_s,
        "speedup": plain_s / spec_s,
        "acceptance_rate": accepted / drafts if drafts else 0.0,
        "mean_accepted_length": 1 + accepted / verify_steps if verify_steps else 0.0,
        "identical_tokens": spec_tokens == plain_tokens,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
