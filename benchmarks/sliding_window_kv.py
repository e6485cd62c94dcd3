"""KV memory of sliding-window layers: blocks given back outside the window against the same model
with every layer's KV kept (the cache layout before cache groups: all layers full attention).

Two measurements, each run with the model's own cache specs ("sliding") and with every spec
overridden to full attention ("all-full"; attention still masks the window, so the tokens are the
same, which is checked):
1. One greedy generation of ``--gen-tokens`` tokens: KV held after every ``--sample-every``
   tokens, in MiB and per cache group (blocks of different layouts hold different numbers of
   layers, so bytes are what compare).
2. Concurrency in a fixed KV budget (``--budget-seqs`` sequences of prompt + generation, as the
   all-full layout stores them): ``--requests`` requests with ``--concurrency-prompt``-token
   prompts under chunked prefill; running sequences per step (peak and mean), preemptions, steps,
   and the sequences the pool holds by ``BlockManager.max_blocks_held``.

Any model effinfer loads works (``--model``, e.g. Gemma 3 270M GGUF); ``--random-model DIR`` first
writes a random-init Qwen2-architecture model with Gemma 3's layer pattern (five sliding-window
layers of 512 tokens to one global layer).
Run: ``python benchmarks/sliding_window_kv.py --random-model /tmp/swa --plot docs/sliding_window_kv.png``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

import effinfer.engine.runner as runner_module
from effinfer import LLM, SamplingParams
from effinfer.engine.cache_groups import KVCacheLayout
from effinfer.layers.cache_spec import AttentionCacheSpec

MODES = ("sliding", "all-full")


def write_random_model(directory: Path, window: int, max_positions: int) -> Path:
    """A small random-init Qwen2 with Gemma 3's 5 local : 1 global layer pattern, and a word tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=max_positions,
        use_sliding_window=True, sliding_window=window, bos_token_id=1, eos_token_id=2,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    # One word per token id: the benchmark feeds token ids, the tokenizer only has to load.
    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return directory


@contextlib.contextmanager
def cache_mode(mode: str):
    """Build engines with the model's cache specs, or with every layer's spec full attention."""
    original = runner_module.cache_layout
    if mode == "all-full":
        runner_module.cache_layout = lambda model: KVCacheLayout.from_specs(
            [AttentionCacheSpec()] * len(runner_module.attention_layers(model))
        )
    try:
        yield
    finally:
        runner_module.cache_layout = original


def make_llm(args, mode: str, kv_bytes: int, max_model_len: int, **engine_args) -> LLM:
    with cache_mode(mode):
        return LLM(
            args.model, dtype=args.dtype, block_size=args.block_size, kv_cache_memory=kv_bytes,
            max_model_len=max_model_len, show_progress=False, **engine_args,
        )  # fmt: skip


def full_layout_bytes(args, num_tokens: int) -> int:
    """KV bytes of one ``num_tokens`` sequence when every layer keeps all its KV."""
    llm = make_llm(args, "all-full", 1 << 30, num_tokens + 1)
    return -(-num_tokens // args.block_size) * llm.engine.runner.kv_bytes_per_block


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def blocks_over_generation(args, mode: str, kv_bytes: int) -> dict:
    total = args.prompt_tokens + args.gen_tokens
    llm = make_llm(args, mode, kv_bytes, total + 1)
    engine, runner = llm.engine, llm.engine.runner
    sliding = [not spec.is_full for spec in runner.layout.group_specs]
    prompt = random_prompt(engine.model_config.vocab_size, args.prompt_tokens, 0)
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True))
    samples, tokens, start = [], [], time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        stats = engine.stats()
        if outputs:
            tokens = list(outputs[0].outputs[0].token_ids)
        if outputs and (len(tokens) % args.sample_every == 0 or len(tokens) == 1) and not outputs[0].finished:
            per_group = stats.blocks_in_use_per_group
            samples.append({
                "generated": len(tokens),
                "mib": stats.num_used_blocks * runner.kv_bytes_per_block / 2**20,
                "sliding_mib": sum(n for n, s in zip(per_group, sliding) if s) * runner.kv_bytes_per_block / 2**20,
                "full_mib": sum(n for n, s in zip(per_group, sliding) if not s) * runner.kv_bytes_per_block / 2**20,
                "blocks_per_group": list(per_group),
            })  # fmt: skip
    return {
        "mode": mode,
        "groups": [("sliding" if s else "full") for s in sliding],
        "layers_per_block": runner.layout.layers_per_block,
        "samples": samples,
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "all_free_after": engine.stats().num_used_blocks == 0,
    }


def concurrency(args, mode: str, kv_bytes: int) -> dict:
    length = args.concurrency_prompt + args.concurrency_gen
    llm = make_llm(
        args, mode, kv_bytes, length + 1, enable_chunked_prefill=True,
        max_num_batched_tokens=args.chunk, max_num_seqs=args.requests,
    )  # fmt: skip
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.concurrency_gen, ignore_eos=True)
    for i in range(args.requests):
        engine.add_request(
            random_prompt(engine.model_config.vocab_size, args.concurrency_prompt, 100 + i), params
        )
    running, start = [], time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        running.append(engine.num_running)
    blocks = engine.block_manager
    return {
        "mode": mode,
        "kv_blocks": blocks.num_blocks,
        "blocks_per_sequence": blocks.max_blocks_held(length, args.chunk),
        "fits": blocks.num_blocks // blocks.max_blocks_held(length, args.chunk),
        "peak_running": max(running),
        "mean_running": sum(running) / len(running),
        "preemptions": engine.stats().num_preemptions,
        "steps": len(running),
        "seconds": time.perf_counter() - start,
    }


def plot(path: str, runs: dict, conc: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot drawn", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for mode, style in (("all-full", "-"), ("sliding", "-")):
        xs = [s["generated"] for s in runs[mode]["samples"]]
        left.plot(xs, [s["mib"] for s in runs[mode]["samples"]], style, label=f"{mode}: all layers")
    xs = [s["generated"] for s in runs["sliding"]["samples"]]
    left.plot(
        xs, [s["sliding_mib"] for s in runs["sliding"]["samples"]], "--", label="sliding: window layers"
    )
    left.plot(xs, [s["full_mib"] for s in runs["sliding"]["samples"]], ":", label="sliding: global layers")
    left.set_xlabel("generated tokens")
    left.set_ylabel("KV cache held (MiB)")
    left.set_title("KV held over one generation")
    left.legend()
    right.bar(MODES, [conc[m]["mean_running"] for m in MODES], color=["tab:orange", "tab:blue"])
    right.set_ylabel("mean running sequences per step")
    right.set_title("Sequences in one KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="any model effinfer loads (HF directory or GGUF)")
    source.add_argument(
        "--random-model", metavar="DIR", help="write a random-init Gemma-3-pattern model here"
    )
    parser.add_argument("--window", type=int, default=512, help="sliding window of --random-model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=8192)
    parser.add_argument("--sample-every", type=int, default=256)
    parser.add_argument("--concurrency-prompt", type=int, default=4000)
    parser.add_argument("--concurrency-gen", type=int, default=96)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--budget-seqs", type=int, default=3, help="KV budget, in all-full sequences")
    parser.add_argument("--chunk", type=int, default=512, help="chunked-prefill token budget")
    parser.add_argument("--plot", metavar="FILE.png")
    parser.add_argument("--json", metavar="FILE", help="write every measurement here")
    args = parser.parse_args()
    if args.random_model:
        max_positions = (
            max(args.prompt_tokens + args.gen_tokens, args.concurrency_prompt + args.concurrency_gen) + 64
        )
        args.model = str(write_random_model(Path(args.random_model), args.window, max_positions))
    print(f"model {args.model}; {platform.processor() or platform.machine()}; torch {torch.__version__}")

    total = args.prompt_tokens + args.gen_tokens
    budget = full_layout_bytes(args, total + args.block_size)
    runs = {mode: blocks_over_generation(args, mode, budget) for mode in MODES}
    same = runs["sliding"]["tokens"] == runs["all-full"]["tokens"]
    print(f"\n### KV held over one {args.gen_tokens}-token generation ({args.prompt_tokens}-token prompt)")
    print(f"greedy tokens identical: {'yes' if same else 'NO'}; all blocks free after: "
          f"{all(r['all_free_after'] for r in runs.values())}")  # fmt: skip
    print("\n| generated | all-full MiB | sliding MiB | of which window layers | global layers |")
    print("|---:|---:|---:|---:|---:|")
    full_by_tokens = {s["generated"]: s for s in runs["all-full"]["samples"]}
    for s in runs["sliding"]["samples"]:
        if s["generated"] in full_by_tokens and (
            s["generated"] & (s["generated"] - 1) == 0 or s is runs["sliding"]["samples"][-1]
        ):
            f = full_by_tokens[s["generated"]]
            print(
                f"| {s['generated']} | {f['mib']:.2f} | {s['mib']:.2f} | {s['sliding_mib']:.2f} | {s['full_mib']:.2f} |"
            )

    length = args.concurrency_prompt + args.concurrency_gen
    conc_budget = args.budget_seqs * full_layout_bytes(args, length)
    conc = {mode: concurrency(args, mode, conc_budget) for mode in MODES}
    print(f"\n### {args.requests} requests of {args.concurrency_prompt} + {args.concurrency_gen} tokens "
          f"in {conc_budget / 2**20:.1f} MiB of KV (chunked prefill, {args.chunk}-token steps)")  # fmt: skip
    print("\n| layout | blocks | blocks per sequence (bound) | sequences that fit | running: peak / mean "
          "| preemptions | steps | s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        c = conc[mode]
        print(f"| {mode} | {c['kv_blocks']} | {c['blocks_per_sequence']} | {c['fits']} "
              f"| {c['peak_running']} / {c['mean_running']:.1f} | {c['preemptions']} | {c['steps']} "
              f"| {c['seconds']:.0f} |")  # fmt: skip
    if args.plot:
        plot(args.plot, runs, conc)
    if args.json:
        for run in runs.values():
            run.pop("tokens")
        Path(args.json).write_text(json.dumps({"generation": runs, "concurrency": conc}, indent=1))


if __name__ == "__main__":
    main()
