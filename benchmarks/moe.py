"""Mixture-of-Experts on CPU: effinfer against transformers on the same random MoE model, and the
load on each expert as the router spreads tokens.

1. Decode (batch 1, ``--decode-tokens`` after a ``--prompt-len`` prompt) and prefill
   (``--prefill-len`` tokens, one request, one output token) tokens/s, effinfer and HF alternating
   in each of ``--rounds`` rounds (same threads, same dtype); medians and effinfer/HF ratios.
2. Expert load: tokens routed to each expert of each MoE layer (``layers/moe.record_expert_load``)
   over one greedy generation, written as a heat map (``--plot``) and into the JSON.
The model is ``--model`` or, with ``--random-model DIR``, a random-init Qwen3-MoE written there
(``--experts`` experts of width ``--expert-width``, top ``--top-k``, renormalised).
Run: ``python benchmarks/moe.py --random-model /tmp/moe --plot docs/moe_expert_load.png``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from effinfer import SamplingParams
from effinfer.bench.hf import HFRunner
from effinfer.bench.report import machine_info, machine_line
from effinfer.bench.throughput import EffinferRunner
from effinfer.config import ModelConfig, parse_dtype
from effinfer.default_model import default_model_path
from effinfer.layers.moe import record_expert_load


def write_random_model(directory: Path, args) -> Path:
    """A random-init Qwen3-MoE (every layer sparse) with the built-in default model's tokenizer."""
    import shutil

    import transformers

    tokenizer_dir = default_model_path()
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
        norm_topk_prob=True, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # spread the router so that it prefers some experts, as trained ones do
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def active_parameters(config: ModelConfig) -> dict:
    """Parameters in the decoder's MLPs: all of them, and those one token runs through."""
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    shared = 3 * config.hidden_size * config.shared_expert_intermediate_size
    dense = 3 * config.hidden_size * config.intermediate_size
    total = active = 0
    for sparse in config.sparse_layers:
        total += config.num_experts * per_expert + shared if sparse else dense
        active += config.num_experts_per_tok * per_expert + shared if sparse else dense
    return {"mlp_parameters": total, "mlp_parameters_per_token": active, "fraction": active / total}


def effinfer_prefill(runner: EffinferRunner, prompt: list[int]) -> float:
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    runner.llm.generate([prompt], params, use_tqdm=False)
    return len(prompt) / (time.perf_counter() - start)


def hf_prefill(runner: HFRunner, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad():
        runner.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
            pad_token_id=runner.pad_token_id,
        )  # fmt: skip
    return len(prompt) / (time.perf_counter() - start)


def expert_load(runner: EffinferRunner, prompts: list[list[int]], tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    with record_expert_load(runner.engine.model) as load:
        runner.llm.generate(prompts, params, use_tqdm=False)
    fractions = load.fractions()
    uniform = 1 / fractions.shape[1]
    return {
        "layers": load.layers,
        "counts": load.counts.tolist(),
        "max_share_over_uniform": (fractions.max(dim=1).values / uniform).tolist(),
        "idle_experts_per_layer": (load.counts == 0).sum(dim=1).tolist(),
    }


def plot_load(load: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(load["counts"], dtype=torch.float64)
    shares = counts / counts.sum(dim=1, keepdim=True) * counts.shape[1]  # 1.0 = a uniform share
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(counts) + 1.8))
    image = ax.imshow(shares, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="tokens routed / uniform share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an MoE model directory")
    parser.add_argument("--random-model", type=Path, help="write a random Qwen3-MoE here and use it")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-width", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--load-tokens", type=int, default=128, help="tokens generated per prompt for the load map"
    )
    parser.add_argument("--plot", help="write the expert-load heat map here (PNG)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if (args.model is None) == (args.random_model is None):
        sys.exit("error: give exactly one of --model and --random-model")
    if args.random_model is not None:
        args.random_model.mkdir(parents=True, exist_ok=True)
        if not (args.random_model / "config.json").is_file():
            write_random_model(args.random_model, args)
        args.model = str(args.random_model)
    config = ModelConfig.from_dir(args.model)
    if not hasattr(config, "sparse_layers"):
        sys.exit(f"error: {args.model} is a {config.architecture}, not a Mixture-of-Experts model")

    torch.manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (args.prompt_len,)).tolist()
    long_prompt = torch.randint(3, config.vocab_size, (args.prefill_len,)).tolist()
    ours = EffinferRunner(args.model, args.dtype, "cpu", args.threads, show_progress=False)
    theirs = HFRunner(
        args.model, parse_dtype(args.dtype), torch.device("cpu"), args.threads, show_progress=False
    )
    # One warm-up of each path, then the rounds, alternating between the engines.
    ours.decode(prompt, 4)
    theirs.decode(prompt, 4)
    effinfer_prefill(ours, long_prompt[:32])
    hf_prefill(theirs, long_prompt[:32])
    runs: dict[str, list[float]] = {
        k: [] for k in ("decode_effinfer", "decode_hf", "prefill_effinfer", "prefill_hf")
    }
    for r in range(args.rounds):
        runs["decode_effinfer"].append(ours.decode(prompt, args.decode_tokens).tokens_per_s)
        runs["decode_hf"].append(theirs.decode(prompt, args.decode_tokens).tokens_per_s)
        runs["prefill_effinfer"].append(effinfer_prefill(ours, long_prompt))
        runs["prefill_hf"].append(hf_prefill(theirs, long_prompt))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    theirs.close()

    load_prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,)).tolist() for _ in range(4)]
    load = expert_load(ours, load_prompts, args.load_tokens)
    result = {
        "model": args.model,
        "architecture": config.architecture,
        "experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "dtype": args.dtype,
        "parameters": ours.num_parameters,
        **active_parameters(config),
        "machine": machine_info(torch.device("cpu"), args.threads, theirs.version),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs_tokens_per_s": runs,
        "median_tokens_per_s": medians,
        "decode_ratio": medians["decode_effinfer"] / medians["decode_hf"],
        "prefill_ratio": medians["prefill_effinfer"] / medians["prefill_hf"],
        "expert_load": load,
    }
    print(machine_line(result["machine"]))
    print(
        f"{config.architecture}, {config.num_experts} experts, top {config.num_experts_per_tok}, {args.dtype}, "
        f"{ours.num_parameters / 1e6:.0f}M parameters; a token runs {result['fraction']:.1%} of the MLP weights"
    )
    print(
        f"decode  (batch 1): effinfer {medians['decode_effinfer']:.1f} tok/s, HF {medians['decode_hf']:.1f} "
        f"tok/s, ratio {result['decode_ratio']:.2f}x"
    )
    print(
        f"prefill ({args.prefill_len} tokens): effinfer {medians['prefill_effinfer']:.0f} tok/s, HF "
        f"{medians['prefill_hf']:.0f} tok/s, ratio {result['prefill_ratio']:.2f}x"
    )
    print("busiest expert / uniform share per layer:", [f"{x:.2f}" for x in load["max_share_over_uniform"]])
    if args.plot:
        plot_load(
            load,
            args.plot,
            f"tokens per expert, {config.architecture}, 4 prompts x {args.load_tokens} generated tokens",
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
