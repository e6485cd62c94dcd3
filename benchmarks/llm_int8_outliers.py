"""LLM.int8() against plain W8A8 on a model with large-magnitude activation channels.

Large LLMs (6.7B parameters and up, Dettmers et al. 2022) grow a few hidden channels whose
activations are 20-100x the rest; small models do not. This script gives the default model such
channels with an exact, function-preserving transform: for a few hidden channels c, the RMSNorm
weight before q/k/v and before gate/up is multiplied by ``--factor`` (a power of two, so the
change is exact in bf16) and input column c of the Linear after it is divided by the same factor.
The float model computes the same function, but the activations entering qkv_proj and
gate_up_proj now carry outlier channels. Then perplexity on the held-out evaluation text (ctx
512, bf16 activations) for:

- bf16, before and after the transform (they must agree);
- LLM.int8() (threshold 6.0): int8 x int8 except the outlier columns, which run in float;
- per-token W8A8 without decomposition (int8 weights per row, activations per token);
- naive W8A8 (one int8 scale per weight tensor and per activation tensor).

    python benchmarks/llm_int8_outliers.py [--factor 32] [--channels 3,17,40,101] [--max-windows 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from effinfer.compress.quant.llm_int8 import outlier_share, quantize_model_llm_int8  # noqa: E402
from effinfer.compress.quant.smoothquant import quantize_model_naive_w8a8  # noqa: E402
from effinfer.config import ModelConfig  # noqa: E402
from effinfer.default_model import default_model_path, heldout_text_path  # noqa: E402
from effinfer.eval.perplexity import perplexity  # noqa: E402
from effinfer.layers.linear import quantizable_linears  # noqa: E402
from effinfer.loading.builder import finalize_model  # noqa: E402
from effinfer.loading.safetensors import load_model  # noqa: E402
from effinfer.tokenizer import Tokenizer  # noqa: E402

CTX = 512


@torch.no_grad()
def inject_outlier_channels(model: torch.nn.Module, channels: list[int], factor: float) -> None:
    """Scale hidden channels ``channels`` up by ``factor`` after each RMSNorm and down in the next Linear."""
    for layer in model.model.layers:
        for norm, linear in (
            (layer.input_layernorm, layer.self_attn.qkv_proj),
            (layer.post_attention_layernorm, layer.mlp.gate_up_proj),
        ):
            norm.weight[channels] *= factor
            linear.weight[:, channels] /= factor


def share_by_projection(model: torch.nn.Module) -> str:
    """Outlier column share of each kind of projection (q/k/v, o, gate/up, down) over all layers."""
    counts: dict[str, list[int]] = {}
    for name, linear in quantizable_linears(model):
        state = getattr(linear._kernel_state, "data", None)
        if hasattr(state, "outlier_columns"):
            c = counts.setdefault(name.split(".")[-1], [0, 0])
            c[0] += state.outlier_columns
            c[1] += state.total_columns
    return ", ".join(f"{k} {100 * o / t:.1f}%" for k, (o, t) in counts.items() if t)


def score(model: torch.nn.Module, tokenizer: Tokenizer, token_ids: list[int], max_windows: int | None):
    """``eval.perplexity`` on a finalized model, through the small part of ``LLM`` it reads."""
    engine = SimpleNamespace(
        runner=SimpleNamespace(model=model), max_model_len=CTX, device=torch.device("cpu")
    )
    llm = SimpleNamespace(engine=engine, tokenizer=tokenizer)
    return perplexity(llm, token_ids=token_ids, ctx=CTX, max_windows=max_windows, show_progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factor", type=float, default=32.0, help="outlier magnitude (a power of 2)")
    parser.add_argument("--channels", default="3,17,40,101", help="hidden channels made outliers")
    parser.add_argument("--threshold", type=float, default=6.0, help="LLM.int8() outlier threshold")
    parser.add_argument("--max-windows", type=int, default=None, help="score only this many windows of 512")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channels = [int(c) for c in args.channels.split(",")]

    path = default_model_path()
    config = ModelConfig.from_dir(path)
    tokenizer = Tokenizer.from_dir(path)
    token_ids = tokenizer.encode(heldout_text_path("evaluation").read_text(encoding="utf-8"))
    dtype, device = torch.bfloat16, torch.device("cpu")
    original = load_model(path, config, dtype, device, CTX, False, finalize=False)
    injected = copy.deepcopy(original)
    inject_outlier_channels(injected, channels, args.factor)

    rows = [
        ("bf16 (original model)", original, None),
        (f"bf16 (outlier channels x{args.factor:g})", injected, None),
        (f"LLM.int8(), threshold {args.threshold:g}", injected,
         lambda m: quantize_model_llm_int8(m, args.threshold)),
        ("W8A8 per-token, no decomposition", injected, lambda m: quantize_model_naive_w8a8(m, per_tensor=False)),
        ("W8A8 naive per-tensor", injected, quantize_model_naive_w8a8),
    ]  # fmt: skip
    results, breakdown = [], ""
    for label, base, method in rows:
        start = time.perf_counter()
        model = copy.deepcopy(base)
        if method is not None:
            method(model)
        model = finalize_model(model, device, dtype)
        ppl = score(model, tokenizer, token_ids, args.max_windows)
        outliers, total = outlier_share(model)
        share = f"{100 * outliers / total:.2f}% ({outliers}/{total})" if total else "-"
        results.append((label, ppl.perplexity, share))
        breakdown = breakdown or share_by_projection(model)
        print(f"{label}: {ppl} [{time.perf_counter() - start:.1f} s]", file=sys.stderr)

    reference = results[0][1]
    print(f"\nDefault model, {len(channels)} hidden channels x{args.factor:g} before q/k/v and gate/up; "
          f"held-out evaluation text, ctx {CTX}, bf16 activations, {ppl.num_tokens} tokens.\n")  # fmt: skip
    print("| model | perplexity | vs bf16 | outlier columns (float path) |")
    print("|---|---:|---:|---:|")
    for label, value, share in results:
        print(f"| {label} | {value:.4f} | {100 * (value / reference - 1):+.2f}% | {share} |")
    # A column counts once per layer call; calls here are whole 512-token windows, so a column is
    # an outlier when any of its 512 tokens exceeds the threshold.
    print(f"\nLLM.int8() outlier columns by projection (per {CTX}-token call): {breakdown}")


if __name__ == "__main__":
    main()
