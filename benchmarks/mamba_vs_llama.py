"""Mamba against a Llama of about the same parameter count: cache memory per sequence and decode
time per token as the context grows (Gu & Dao 2023; the survey's §4.3 on Transformer alternates).

Both models are random-init (their speed and memory do not depend on the weights) and fed token
ids. For each context C in ``--contexts``: one sequence with a C-token prompt (prefilled in chunks of
``--prefill-chunk`` tokens), then ``--new-tokens`` greedy tokens (``--new-tokens-long`` from
``--long-from`` tokens on, to fit the time). Prefill tokens/s is the prompt over the time to the
first token (every prompt chunk; the first context's includes first-call warm-up); decode time is
the median step time after the prompt; cache per sequence is what the engine holds for it at the end: Llama's KV blocks times the bytes per
block, Mamba's one state slot (the engine's own accounting, not the process's RSS).
Run: ``python benchmarks/mamba_vs_llama.py --out docs/results/mamba_vs_llama.json --plot docs/mamba_vs_llama.png``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams
from effinfer.bench.models import write_byte_level_tokenizer

VOCAB = 8192


def write_models(directory: Path, max_positions: int) -> dict[str, Path]:
    """A 16-layer Mamba (hidden 768) and a 10-layer Llama (hidden 768, GQA 12/4): about 67M and 69M parameters."""
    import transformers

    configs = {
        transformers.MambaForCausalLM: transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=768, state_size=16, num_hidden_layers=16,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        transformers.LlamaForCausalLM: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
            num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=max_positions,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        ),
    }  # fmt: skip
    paths = {}
    for model_class, config in configs.items():
        name = config.model_type
        path = directory / name
        written = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if written.get("max_position_embeddings", max_positions) < max_positions or not written:
            torch.manual_seed(0)
            model_class(config).save_pretrained(path)
            write_byte_level_tokenizer(path, VOCAB)
        paths[name] = path
    return paths


def count_parameters(llm: LLM) -> int:
    return sum(p.numel() for p in dict(llm.engine.model.named_parameters()).values())


def cache_bytes(llm: LLM) -> int:
    """Bytes the engine holds for its one running sequence: KV blocks in use plus its state slot."""
    engine = llm.engine
    blocks = engine.block_manager
    used_slots = blocks.num_state_slots - blocks.num_free_state_slots
    kv = (blocks.num_blocks - blocks.num_free_blocks) * engine.runner.kv_bytes_per_block
    return kv + used_slots * engine.runner.state_bytes_per_slot


def measure(llm: LLM, context: int, new_tokens: int) -> dict:
    engine = llm.engine
    prompt = torch.randint(3, VOCAB, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    while not engine.step():  # prompt chunks until the step that samples the first token
        pass
    prefill_s = time.perf_counter() - start
    held, steps = cache_bytes(llm), []
    while engine.has_unfinished_requests():
        held = cache_bytes(llm)  # before the step that may finish the sequence and free its cache
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    decode_s = statistics.median(steps)
    return {
        "context": context,
        "new_tokens": new_tokens,
        "prefill_s": round(prefill_s, 2),
        "prefill_tokens_per_s": round(context / prefill_s, 1),
        "decode_ms_per_token": round(decode_s * 1e3, 2),
        "decode_tokens_per_s": round(1 / decode_s, 1),
        "cache_mib_per_seq": round(held / 2**20, 2),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results["models"].items():
        contexts = [r["context"] for r in rows["points"]]
        label = f"{name} ({rows['parameters'] / 1e6:.0f}M)"
        mem.plot(contexts, [r["cache_mib_per_seq"] for r in rows["points"]], "o-", label=label)
        speed.plot(contexts, [r["decode_ms_per_token"] for r in rows["points"]], "o-", label=label)
    for ax, title in ((mem, "cache per sequence (MiB)"), (speed, "decode time per token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Mamba vs Llama of equal size, CPU float32, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mamba_vs_llama"))
    parser.add_argument("--contexts", default="256,2048,8192")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--new-tokens-long", type=int, default=12)
    parser.add_argument("--long-from", type=int, default=8192)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        print(f"error: --contexts must be comma-separated integers, got {args.contexts!r}", file=sys.stderr)
        return 2
    max_len = max(contexts) + max(args.new_tokens, args.new_tokens_long) + 64
    paths = write_models(args.models_dir, max_len)
    results = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "models": {},
    }
    for name, path in paths.items():
        llm = LLM(
            str(path), dtype="float32", num_threads=args.threads, max_model_len=max_len, max_num_seqs=1,
            enable_chunked_prefill=True, max_num_batched_tokens=args.prefill_chunk,
            enable_prefix_caching=False, show_progress=False,
        )  # fmt: skip
        points = []
        for context in contexts:
            new_tokens = args.new_tokens_long if context >= args.long_from else args.new_tokens
            points.append(measure(llm, context, new_tokens))
            print(name, json.dumps(points[-1]), flush=True)
        results["models"][name] = {"parameters": count_parameters(llm), "points": points}
        del llm
    mamba, llama = results["models"]["mamba"]["points"], results["models"]["llama"]["points"]
    results["ratios_llama_over_mamba"] = [
        {
            "context": m["context"],
            "cache": round(ll["cache_mib_per_seq"] / m["cache_mib_per_seq"], 2),
            "decode_time": round(ll["decode_ms_per_token"] / m["decode_ms_per_token"], 2),
        }
        for m, ll in zip(mamba, llama)
    ]
    print(json.dumps(results["ratios_llama_over_mamba"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
