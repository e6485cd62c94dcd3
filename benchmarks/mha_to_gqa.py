"""MHA -> GQA on the built-in default model (4 heads, 4 KV heads): quality, KV memory and decode speed.

For 2 and 1 KV heads (``effinfer convert --to-gqa``), measures held-out perplexity right after the
conversion and after uptraining with ``effinfer train --init`` on a share of the default model's
training tokens (same corpus, same held-out split), KV cache bytes per token as the engine sizes
them, and batched decode speed at a context of ~500 tokens as a ratio to the MHA model measured
in the same run. Writes a JSON file and a plot (matplotlib).

    python benchmarks/mha_to_gqa.py --work /tmp/mha-gqa --share 0.05 --json docs/results/mha_to_gqa.json \
        --plot docs/mha_to_gqa.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams
from effinfer.compress.gqa import convert_to_gqa
from effinfer.default_model import DEFAULT_MODEL_DIR, heldout_text_path
from effinfer.engine.runner import kv_bytes_per_block
from effinfer.eval.perplexity import perplexity
from effinfer.train import main as train_main

# How the default model was trained (docs/default-model.md): its corpus, split and sequence length.
PRETRAINING_TOKENS = 6000 * 4096
EXCLUDE = "test,tests,idle_test,site-packages,__pycache__,encodings"
SEQ_LEN = 512


def uptrain(init: Path, out: Path, share: float, batch_size: int, lr: float, max_minutes: float) -> dict:
    """``effinfer train --init``: ``share`` of the pre-training tokens on the same corpus and held-out split."""
    steps = max(1, round(share * PRETRAINING_TOKENS / (batch_size * SEQ_LEN)))
    stdlib = sysconfig.get_paths()["stdlib"]
    args = ["--data", stdlib, "--include", "*.py", "--exclude", EXCLUDE, "--val-fraction", "0.02"]
    args += ["--seq-len", str(SEQ_LEN), "--batch-size", str(batch_size), "--lr", str(lr)]
    args += ["--warmup-steps", str(max(1, steps // 10)), "--max-steps", str(steps), "--min-lr-ratio", "0.1"]
    args += ["--eval-every", "0", "--save-every", "0", "--max-time-minutes", str(max_minutes)]
    args += ["--seed", "0", "--save-dtype", "bfloat16", "--init", str(init), "--out", str(out)]
    start = time.perf_counter()
    if train_main(args) != 0:
        raise SystemExit(f"uptraining {init} failed")
    summary = json.loads((out / "train_summary.json").read_text())
    return {
        "steps": summary["steps"],
        "planned_steps": steps,
        "tokens": summary["tokens_seen"],
        "share_of_pretraining": summary["tokens_seen"] / PRETRAINING_TOKENS,
        "seconds": time.perf_counter() - start,
        "held_out_files": summary["held_out_files"],
    }


def held_out_perplexity(path: Path) -> float:
    llm = LLM(str(path), dtype="float32", device="cpu", show_progress=False)
    return perplexity(llm, path=heldout_text_path("evaluation"), ctx=SEQ_LEN, show_progress=False).perplexity


def decode_step_seconds(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Times of the decode steps once every sequence of the batch has finished its prefill."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    generated: dict[str, int] = {}
    step_seconds = []
    while engine.has_unfinished_requests():
        all_decoding = len(generated) == len(prompts) and min(generated.values()) > 0
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        for output in outputs:
            generated[output.request_id] = len(output.outputs[0].token_ids)
        if all_decoding:
            step_seconds.append(elapsed)
    return step_seconds


def decode_speed(models: dict[str, Path], batch: int, context: int, repeats: int) -> dict[str, dict]:
    """Decode tokens/s of each model at batch ``batch`` and contexts ``context - 48`` .. ``context``.

    The models take turns, so a busy moment of the shared machine hits each alike; besides the
    median step, the fastest step is kept (on a shared machine it is whichever step ran alone, so
    it says little about the ratio).
    """
    llms = {name: LLM(str(path), device="cpu", show_progress=False) for name, path in models.items()}
    tokens = next(iter(llms.values())).tokenizer.encode(heldout_text_path("evaluation").read_text())
    new_tokens = 48
    prompts = [tokens[i * 300 : i * 300 + context - new_tokens] for i in range(batch)]
    for llm in llms.values():  # first calls pay for kernel set-up and allocation
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, llm in llms.items():
            seconds[name] += decode_step_seconds(llm, prompts, new_tokens)
    return {
        name: {"median": batch / statistics.median(values), "fastest": batch / min(values)}
        for name, values in seconds.items()
    }


def with_max_positions(model_dir: Path, out: Path, max_positions: int) -> Path:
    """The same weights with ``max_position_embeddings`` raised, for timing contexts past the
    512 tokens the default model was trained on: a step's cost does not depend on the weights'
    values, only on shapes and context, so the text past 512 tokens may be nonsense."""
    out.mkdir(parents=True, exist_ok=True)
    for file in model_dir.iterdir():
        target = out / file.name
        if file.name == "config.json":
            config = json.loads(file.read_text()) | {"max_position_embeddings": max_positions}
            target.write_text(json.dumps(config, indent=2))
        elif file.is_file() and not target.exists():
            target.symlink_to(file.resolve())
    return out


def speed_only(work: Path, kv_heads: list[int], contexts: list[int], batch: int, repeats: int) -> int:
    """Decode speed of MHA vs the converted models at each context, ratios within one run."""
    max_positions = max(contexts)
    models = {"MHA": with_max_positions(DEFAULT_MODEL_DIR, work / f"mha-{max_positions}", max_positions)}
    for heads in kv_heads:
        converted = work / f"gqa{heads}"
        if not converted.is_dir():
            convert_to_gqa(DEFAULT_MODEL_DIR, converted, heads, show_progress=False)
        name = "MQA-1" if heads == 1 else f"GQA-{heads}"
        models[name] = with_max_positions(converted, work / f"gqa{heads}-{max_positions}", max_positions)
    print("| context | " + " | ".join(f"{n} tok/s (ratio)" for n in models) + " |")
    print("|---:|" + "---:|" * len(models))
    for context in contexts:
        speeds = decode_speed(models, batch, context, repeats)
        mha = speeds["MHA"]["median"]
        cells = " | ".join(f"{speeds[n]['median']:.1f} ({speeds[n]['median'] / mha:.2f})" for n in models)
        print(f"| {context} | {cells} |", flush=True)
    return 0


def kv_bytes_per_token(path: Path, dtype: torch.dtype) -> int:
    llm = LLM(str(path), device="cpu", dtype=str(dtype).removeprefix("torch."), show_progress=False)
    block_size = llm.engine.config.block_size
    return kv_bytes_per_block(llm.engine.model_config, block_size, dtype) // block_size


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    names = list(rows)
    fig, (ppl_ax, kv_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    bars = ppl_ax.bar(names, [rows[n]["perplexity"] for n in names], color=[rows[n]["color"] for n in names])
    ppl_ax.bar_label(bars, fmt="%.1f")
    ppl_ax.set_ylabel("held-out perplexity (lower is better)")
    ppl_ax.set_title("quality")
    ppl_ax.tick_params(axis="x", rotation=30)
    for label in ppl_ax.get_xticklabels():
        label.set_horizontalalignment("right")
    kv_names = [n for n in names if "decode_tokens_per_s" in rows[n]]
    x = list(range(len(kv_names)))
    kv_ax.bar(x, [rows[n]["kv_bytes_per_token"] for n in kv_names], color="tab:gray")
    kv_ax.set_xticks(x, [n.split(" ")[0] for n in kv_names])
    kv_ax.set_ylabel("KV cache bytes per token (bf16, gray bars)")
    speed_ax = kv_ax.twinx()
    speed_ax.plot(x, [rows[n]["decode_speed_vs_mha"] for n in kv_names], "o-", color="tab:red")
    speed_ax.set_ylabel("decode speed vs MHA (median step, batch 16)", color="tab:red")
    speed_ax.set_ylim(0, max(1.5, 1.1 * max(rows[n]["decode_speed_vs_mha"] for n in kv_names)))
    kv_ax.set_title("memory and speed")
    fig.suptitle("MHA -> GQA on the default model (4 query heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="directory for the converted models")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[2, 1])
    parser.add_argument(
        "--share", type=float, default=0.005, help="uptraining tokens / pre-training tokens (paper: 0.05)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="uptraining rows of 512 tokens per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="uptraining peak learning rate")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="cap on each uptraining run")
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-context", type=int, default=496)
    parser.add_argument(
        "--speed-only", type=int, nargs="+", metavar="CONTEXT",
        help="only decode speed, at these contexts (past 512: the same weights with more positions)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw --plot from a results file")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    if args.speed_only:
        return speed_only(args.work, args.kv_heads, args.speed_only, args.decode_batch, args.repeats)
    models = {"MHA (4 KV heads)": {"path": DEFAULT_MODEL_DIR, "color": "tab:blue"}}
    uptraining = {}
    for heads in args.kv_heads:
        converted = args.work / f"gqa{heads}"
        if not converted.is_dir():
            print(convert_to_gqa(DEFAULT_MODEL_DIR, converted, heads, show_progress=False))
        tuned = args.work / f"gqa{heads}-uptrained"
        if not (tuned / "model.safetensors").is_file():
            uptraining[heads] = uptrain(
                converted, tuned, args.share, args.batch_size, args.lr, args.max_minutes
            )
        else:
            summary = json.loads((tuned / "train_summary.json").read_text())
            uptraining[heads] = {"steps": summary["steps"], "tokens": summary["tokens_seen"]}
            uptraining[heads]["share_of_pretraining"] = summary["tokens_seen"] / PRETRAINING_TOKENS
        label = "MQA" if heads == 1 else "GQA"
        models[f"{label}-{heads} converted"] = {"path": converted, "color": "tab:orange", "heads": heads}
        models[f"{label}-{heads} uptrained"] = {"path": tuned, "color": "tab:green", "heads": heads}

    speed_models = {n: m["path"] for n, m in models.items() if "uptrained" not in n}
    speeds = decode_speed(speed_models, args.decode_batch, args.decode_context, args.repeats)
    mha_speed = speeds["MHA (4 KV heads)"]["median"]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "uptraining": {
            str(k): {k2: v2 for k2, v2 in v.items() if k2 != "held_out_files"} for k, v in uptraining.items()
        },
        "models": {},
    }
    for name, model in models.items():
        row = {"perplexity": held_out_perplexity(model["path"]), "color": model["color"]}
        if name in speeds:
            row["kv_bytes_per_token"] = kv_bytes_per_token(model["path"], torch.bfloat16)
            row["decode_tokens_per_s"] = speeds[name]["median"]
            row["decode_tokens_per_s_fastest_step"] = speeds[name]["fastest"]
            row["decode_speed_vs_mha"] = speeds[name]["median"] / mha_speed
        results["models"][name] = row
        extra = "".join(f", {k} {v:.4g}" for k, v in row.items() if k not in ("perplexity", "color"))
        print(f"{name}: perplexity {row['perplexity']:.3f}{extra}", flush=True)
    print(json.dumps(results["uptraining"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
