"""StreamingLLM's perplexity experiment (Xiao et al. 2023, fig. 3) on a model here.

A long text (the files of ../shared/data/text, an equal share of tokens from each, concatenated)
is scored token by token, each token seeing what its cache keeps:

- dense, windows of the trained context: the text cut into trained-context windows (reference);
- dense past the trained context: one sequence, full attention (first --dense-tokens only);
- window: the last W tokens only (positions within the cache, as RoPE's relative scores give);
- window + sinks: the first N tokens plus the last W (layers/attention_sinks.py);
- window with re-computation: each token after its W - 1 predecessors, re-encoded from scratch at
  positions 0..W-1; re-encoded every --recompute-stride tokens to keep it cheap (so a token sees
  W - stride .. W - 1 predecessors).

The streaming runs go through the engine's paged cache in chunks (exact: a token's result does not
depend on the chunking). Writes a JSON of per-token NLLs' summary and a plot of perplexity vs
position.

    python benchmarks/attention_sinks_ppl.py --tokens 20000 --window 256 --sinks 4
    python benchmarks/attention_sinks_ppl.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --window 512 --tokens 20000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effinfer import LLM
from effinfer.eval.perplexity import streaming_nll
from effinfer.layers.attention import PagedAttention

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIR = ROOT.parent / "shared" / "data" / "text"
RUNS = ("dense", "dense-past", "window", "sinks", "recompute")


def long_text_ids(tokenizer, text_path: Path, num_tokens: int) -> list[int]:
    """An equal share of ``num_tokens`` from the start of each file in ``text_path`` (a folder or one
    file), concatenated."""
    files = sorted(p for p in text_path.iterdir() if p.is_file()) if text_path.is_dir() else [text_path]
    share = -(-num_tokens // len(files))
    ids: list[int] = []
    for path in files:
        # About 4 characters per token for these tokenizers; read twice that to be safe.
        head = path.open(encoding="utf-8", errors="replace").read(share * 8)
        ids.extend(tokenizer.encode(head)[:share])
    return ids[:num_tokens]


def windowed_dense_nll(llm: LLM, ids: list[int], ctx: int, stride: int) -> torch.Tensor:
    """NLL of ids[1:], scored in windows of ``ctx`` tokens advancing by ``stride`` (fresh each time)."""
    model, device = llm.engine.model, llm.engine.device
    nll = torch.full((len(ids) - 1,), float("nan"))
    tokens = torch.tensor(ids, device=device)
    with torch.inference_mode():
        for begin in range(0, len(ids) - 1, stride):
            window = tokens[begin : begin + ctx]
            logits = model.compute_logits(model.forward_dense(window[None]))[0].float()
            first = 0 if begin == 0 else ctx - stride  # predictions not scored by an earlier window
            scores = F.cross_entropy(logits[:-1], window[1:], reduction="none")[first:]
            nll[begin + first : begin + first + len(scores)] = scores.cpu()
            if begin + ctx >= len(ids):
                break
    return nll


def first_token_attention(llm: LLM, ids: list[int], queries: slice) -> float:
    """Mean attention probability that the ``queries`` put on the first token (all layers and heads),
    under full attention: how much the model uses it as a sink."""
    model, shares = llm.engine.model, []

    def record(module, args) -> None:
        q, k = args[0], args[1]
        group = module.num_heads // module.num_kv_heads
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, T, d]
        scores = (q.transpose(0, 1) @ k.transpose(1, 2)).float() * module.scale
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        shares.append(torch.softmax(scores, dim=-1)[:, queries, 0].mean().item())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, PagedAttention)]
    try:
        with torch.inference_mode():
            model.forward_dense(torch.tensor([ids], device=llm.engine.device))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(shares) / len(shares)


def summary(nll: torch.Tensor, edges: list[int]) -> dict[str, float]:
    """Perplexity over [a, b) for consecutive edges (token index of the predicted token - 1)."""
    out = {}
    for a, b in zip(edges, edges[1:]):
        part = nll[a:b]
        part = part[~part.isnan()]
        if len(part):
            out[f"{a}-{b}"] = math.exp(part.mean().item())
    return out


def plot(curves: dict[str, torch.Tensor], path: Path, title: str, trained: int, bin_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, nll in curves.items():
        usable = len(nll) // bin_size * bin_size
        bins = nll[:usable].view(-1, bin_size).nanmean(dim=1).exp()
        centres = torch.arange(len(bins)) * bin_size + bin_size / 2
        ax.plot(centres.numpy(), bins.numpy(), label=name)
    ax.axvline(trained, color="grey", linestyle=":", label=f"trained context ({trained})")
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel(f"perplexity ({bin_size}-token bins)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the built-in model)")
    parser.add_argument("--text", type=Path, default=TEXT_DIR, help="a folder of texts, or one file")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=128, help="tokens per step through the cache")
    parser.add_argument("--dense-tokens", type=int, default=4096, help="dense past the context: this many")
    parser.add_argument("--recompute-stride", type=int, default=32, help="0: skip the re-computation run")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bin", type=int, default=256, help="plot bin width in tokens")
    parser.add_argument(
        "--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs (default: all)"
    )
    parser.add_argument(
        "--attention-only", action="store_true", help="only measure the attention on the first token"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "attention_sinks_ppl")
    args = parser.parse_args()

    common = dict(dtype=args.dtype, show_progress=False, num_threads=args.threads, max_num_seqs=1)
    base = LLM(args.model, **common)
    trained = base.engine.model_config.max_position_embeddings
    ids = long_text_ids(base.tokenizer, args.text, args.tokens)
    print(f"{len(ids)} tokens from {args.text}; trained context {trained}", flush=True)
    span = min(trained, 1024)
    sink_share = first_token_attention(base, ids[:span], slice(span // 2, span))
    print(f"attention on the first token (queries {span // 2}-{span}): {sink_share:.3f}", flush=True)
    if args.attention_only:
        return
    kv_bytes = 1 << 30  # the streaming runs keep the whole text's blocks until KV freeing lands

    def streaming(**window_args) -> torch.Tensor:
        llm = LLM(args.model, **common, **window_args, max_model_len=len(ids), kv_cache_memory=kv_bytes)
        return streaming_nll(llm, ids, args.chunk, show_progress=True)

    runs: dict[str, torch.Tensor] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        runs[name] = fn()
        timings[name] = time.perf_counter() - start
        print(f"{name}: {timings[name]:.0f} s, ppl {math.exp(runs[name].nanmean().item()):.2f}", flush=True)

    if "dense" in args.runs:
        timed(f"dense, {trained}-token windows", lambda: windowed_dense_nll(base, ids, trained, trained))
    dense_ids = ids[: args.dense_tokens]
    if "dense-past" in args.runs:
        timed(
            "dense past the context",
            lambda: streaming_nll(
                LLM(args.model, **common, sliding_window=len(dense_ids), max_model_len=len(dense_ids),
                    kv_cache_memory=kv_bytes),
                dense_ids, args.chunk,
            ),
        )  # fmt: skip
    if "window" in args.runs:
        timed(f"window {args.window}", lambda: streaming(sliding_window=args.window))
    if "sinks" in args.runs:
        timed(
            f"window {args.window} + {args.sinks} sinks",
            lambda: streaming(sliding_window=args.window, attention_sinks=args.sinks),
        )
    if "recompute" in args.runs and args.recompute_stride:
        stride = args.recompute_stride
        timed(
            f"window {args.window}, re-computed every {stride}",
            lambda: windowed_dense_nll(base, ids, args.window, stride),
        )
    torch.save({name: nll.half() for name, nll in runs.items()}, args.out.with_suffix(".nll.pt"))

    edges = [0, trained, 2 * trained, 4 * trained, 8192, 16384, len(ids)]
    edges = sorted({e for e in edges if e <= len(ids) - 1} | {len(ids) - 1})
    results = {
        name: {
            "overall": math.exp(nll.nanmean().item()),
            "by_position": summary(nll, edges),
            "seconds": timings[name],
        }
        for name, nll in runs.items()
    }
    meta = {
        "model": args.model or "built-in default model",
        "tokens": len(ids),
        "trained_context": trained,
        "window": args.window,
        "sinks": args.sinks,
        "chunk": args.chunk,
        "dtype": args.dtype,
        "first_token_attention": sink_share,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    name = Path(args.model).name if args.model else "default model"
    plot(
        runs,
        args.out.with_suffix(".png"),
        f"{name}: perplexity along a {len(ids)}-token text",
        trained,
        args.bin,
    )
    print("| run | " + " | ".join(results[next(iter(results))]["by_position"]) + " | all |")
    for run, r in results.items():
        cells = " | ".join(f"{v:.2f}" for v in r["by_position"].values())
        print(f"| {run} | {cells} | {r['overall']:.2f} |")


if __name__ == "__main__":
    main()
