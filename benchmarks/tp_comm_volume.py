"""Bytes a tensor-parallel rank communicates per token (not a timing: the collectives count them).

Megatron-style tensor parallelism sends, per token and per decoder layer, two all-reduces of the
hidden state (after attention's o_proj and the MLP's down_proj), plus one all-reduce after the
vocabulary-parallel embedding and one all-gather of the logits shard; the driver also broadcasts
each step's inputs (token ids, positions, slot mappings, block tables). The counters in
``effinfer/distributed.py`` record each collective's payload on the driver (rank 0; the other
ranks carry the same all-reduce and all-gather payloads and receive the broadcast).

Prefill is measured on a prompt, decode as the difference of a longer generation (prefix cache off),
divided by the tokens. ``--random smollm2`` builds SmolLM2-135M's shape (576 hidden, 30 layers,
1536 MLP, 49,152 vocabulary, tied) with 8 query / 4 KV heads so that TP=2 divides them (the real
model's 9 / 3 heads take TP=3 only).

    python benchmarks/tp_comm_volume.py --random smollm2 --tp 2
    python benchmarks/tp_comm_volume.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf --tp 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from effinfer import LLM, SamplingParams
from effinfer.distributed import comm_bytes, reset_comm_bytes

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def random_smollm2_shaped(directory: Path, dtype: str) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2_SHAPE)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    tokenizer = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "stories260K" / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tokenizer / name).read_bytes())
    return directory


def measure(model: str, tp: int, dtype: str, prompt_tokens: int, decode_tokens: int) -> dict:
    llm = LLM(model, dtype=dtype, tensor_parallel_size=tp, enable_prefix_caching=False, show_progress=False)
    prompt = [1] + [100 + i % 200 for i in range(prompt_tokens - 1)]
    try:
        reset_comm_bytes()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        prefill = comm_bytes()
        reset_comm_bytes()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1 + decode_tokens, ignore_eos=True))
        total = comm_bytes()
    finally:
        llm.shutdown()
    decode = {op: (total.get(op, 0) - prefill.get(op, 0)) / decode_tokens for op in total}
    return {
        "model": model,
        "tensor_parallel_size": tp,
        "dtype": dtype,
        "prompt_tokens": prompt_tokens,
        "prefill_bytes_per_token": {op: n / prompt_tokens for op, n in prefill.items()},
        "decode_bytes_per_token": decode,
        "decode_bytes_per_token_total": sum(decode.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF directory or .gguf file")
    parser.add_argument("--random", choices=("smollm2",), help="a random model of this shape instead")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    if (args.model is None) == (args.random is None):
        parser.error("give --model or --random")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(random_smollm2_shaped(Path(tmp), args.dtype))
        result = measure(model, args.tp, args.dtype, args.prompt_tokens, args.decode_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
