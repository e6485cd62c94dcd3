"""Structured pruning on a real model: held-out perplexity and CPU prefill / decode speed of each
pruned (smaller, dense) model against the dense model, measured in one run.

The model (default: SmolLM2-135M-Instruct Q4_1 GGUF) is dequantized once; every setting prunes a
copy with ``prune_structured`` on the same calibration rows (the second half of the TinyStories
validation text) and is written with the same writer as the dense baseline, in bfloat16, so the
models differ only in what was removed. Perplexity is scored on the first half of that text (held
out from calibration) and on Tiny Shakespeare (another domain); speed is batch-1 decode and a
512-token prefill, the models taking turns so a busy moment of the shared machine hits each alike.
With ``--recover-steps N``, the dense model and the pruned ones named by ``--recover`` are each
fine-tuned for N steps with ``effinfer train --init`` on the calibration half (same flags and seed),
so a recovered model is compared with a dense model that saw the same text.

    python benchmarks/structured_pruning.py --work /tmp/structured \\
        --json docs/results/structured_pruning.json --plot docs/structured_pruning.png
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from effinfer.bench.throughput import EffinferRunner
from effinfer.compress.calibration import calibration_batches
from effinfer.compress.prune.structured import load_float, prune_structured, save_pruned
from effinfer.eval.perplexity import perplexity
from effinfer.sampling_params import SamplingParams
from effinfer.tokenizer import Tokenizer
from effinfer.train import main as train_main

DEFAULT_MODEL = Path("~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
TEXTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
# Every engine gets a small KV cache (eight are alive at once during the speed rounds) and no prefix
# cache (the timed prefill repeats a prompt).
ENGINE = dict(
    device="cpu",
    show_progress=False,
    kv_cache_memory=256 * 2**20,
    max_model_len=1024,
    enable_prefix_caching=False,
)
# name -> (KV-group sparsity, MLP sparsity, query-head sparsity per group, importance); None: dense.
SETTINGS: dict[str, tuple[float, float, float, str] | None] = {
    "dense": None,
    "mlp 12.5%": (0.0, 0.125, 0.0, "activation"),
    "mlp 25%": (0.0, 0.25, 0.0, "activation"),
    "mlp 25% (fluctuation)": (0.0, 0.25, 0.0, "fluctuation"),
    "mlp 25% (taylor)": (0.0, 0.25, 0.0, "taylor"),
    "mlp 50%": (0.0, 0.5, 0.0, "activation"),
    "q-heads 1/3 + mlp 25%": (0.0, 0.25, 1 / 3, "activation"),
    "kv-groups 1/3 + mlp 25%": (1 / 3, 0.25, 0.0, "activation"),
}


def write_models(args: argparse.Namespace, calib_text: Path) -> dict[str, Path]:
    base, hf_config, tokenizer = load_float(args.model)
    ids = calibration_batches(tokenizer, calib_text, args.num_samples, args.seq_len)
    paths = {}
    for name in args.settings:
        setting = SETTINGS[name]
        out = args.work / "".join(c if c.isalnum() else "_" for c in name)
        paths[name] = out
        if (out / "config.json").is_file():
            continue
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if setting is not None:
            attention, mlp, query, importance = setting
            prune_structured(model, ids, 0.0, attention_sparsity=attention, mlp_sparsity=mlp,
                             query_sparsity=query, importance=importance, show_progress=False)  # fmt: skip
        save_pruned(model, hf_config, tokenizer, out, torch.bfloat16)
        print(f"{name}: written in {time.perf_counter() - start:.0f} s", flush=True)
    sample = calib_text.read_text()[:20_000]
    if Tokenizer.from_dir(paths["dense"]).encode(sample) != tokenizer.encode(sample):
        raise SystemExit("the written tokenizer encodes differently from the model's own")
    return paths


def measure_quality(path: Path, texts: dict[str, str], windows: int) -> dict:
    runner = EffinferRunner(str(path), **ENGINE)
    model = runner.engine.model
    config = runner.engine.model_config
    result = {
        "parameters": runner.num_parameters,
        "non_embedding_parameters": sum(p.numel() for n, p in model.named_parameters() if "embed" not in n),
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "intermediate_size": config.intermediate_size,
    }
    for name, text in texts.items():
        ppl = perplexity(runner.llm, text=text, ctx=512, max_windows=windows, show_progress=False)
        result[f"ppl_{name}"] = ppl.perplexity
        result[f"tokens_{name}"] = ppl.num_tokens
    return result


def recover(
    init: Path, out: Path, data: Path, steps: int, minutes: float, threads: int | None = None
) -> dict:
    """``effinfer train --init``: a short fine-tune on ``data``; what it ran."""
    if not (out / "config.json").is_file():
        args = ["--data", str(data), "--val-fraction", "0", "--seq-len", "256", "--batch-size", "4"]
        args += ["--lr", "5e-5", "--warmup-steps", str(max(1, steps // 10)), "--max-steps", str(steps)]
        args += ["--eval-every", "0", "--save-every", "0", "--max-time-minutes", str(minutes), "--seed", "0"]
        args += ["--threads", str(threads)] if threads else []
        start = time.perf_counter()
        if train_main([*args, "--save-dtype", "bfloat16", "--init", str(init), "--out", str(out)]) != 0:
            raise SystemExit(f"fine-tuning {init} failed")
        print(f"fine-tuned {init.name} in {time.perf_counter() - start:.0f} s", flush=True)
    summary = json.loads((out / "train_summary.json").read_text())
    return {"steps": summary["steps"], "tokens": summary["tokens_seen"], "train_seconds": summary["train_seconds"],
            "train_loss": summary["train_loss"]}  # fmt: skip


def measure_speed(paths: dict[str, Path], prompt_text: str, repeats: int, decode_tokens: int) -> dict:
    runners = {name: EffinferRunner(str(p), **ENGINE) for name, p in paths.items()}
    tokens = next(iter(runners.values())).llm.tokenizer.encode(prompt_text)
    prefill_prompt, decode_prompt = tokens[:512], tokens[:32]
    one_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for runner in runners.values():  # first calls pay for kernel set-up and allocation
        runner.decode(decode_prompt, 4)
        runner.llm.generate([prefill_prompt], one_token)
    decode = {name: [] for name in runners}
    prefill = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            decode[name].append(runner.decode(decode_prompt, decode_tokens).tokens_per_s)
            start = time.perf_counter()
            runner.llm.generate([prefill_prompt], one_token)
            prefill[name].append(len(prefill_prompt) / (time.perf_counter() - start))
    return {
        name: {
            "decode_tokens_per_s": statistics.median(decode[name]),
            "prefill_tokens_per_s": statistics.median(prefill[name]),
        }
        for name in runners
    }


def paired_bars(ax, rows: dict, names: list[str], left: tuple[str, str], right: tuple[str, str]) -> None:
    x = range(len(names))
    for shift, (key, label) in ((-0.2, left), (0.2, right)):
        ax.bar([i + shift for i in x], [rows[n][key] for n in names], 0.4, label=label)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.legend()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    names = list(rows)
    fig, (ppl_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    paired_bars(
        ppl_ax,
        rows,
        names,
        ("ppl_stories", "TinyStories (held out)"),
        ("ppl_shakespeare", "Tiny Shakespeare"),
    )
    ppl_ax.set_ylabel("perplexity (lower is better)")
    ppl_ax.set_yscale("log")
    ppl_ax.set_title("quality")
    timed = [n for n in names if "decode_speedup" in rows[n]]
    paired_bars(
        speed_ax,
        rows,
        timed,
        ("decode_speedup", "decode (batch 1)"),
        ("prefill_speedup", "prefill (512 tokens)"),
    )
    speed_ax.axhline(1.0, color="gray", lw=0.8)
    speed_ax.set_ylabel("speed vs dense (same run)")
    speed_ax.set_title("CPU speed")
    fig.suptitle(f"structured pruning of {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file or HF directory")
    parser.add_argument("--work", type=Path, required=True, help="directory for the pruned models")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration rows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row")
    parser.add_argument("--windows", type=int, default=8, help="512-token perplexity windows per text")
    parser.add_argument("--repeats", type=int, default=3, help="speed rounds (models take turns)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, help="CPU threads for perplexity and fine-tuning (1 on a busy machine)"
    )
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the speed rounds (perplexity and fine-tuning only: a busy machine's timings are noise)")  # fmt: skip
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which settings to write and measure (dense is always measured)")  # fmt: skip
    parser.add_argument("--recover-steps", type=int, default=0, help="fine-tune steps (0: none)")
    parser.add_argument("--recover-minutes", type=float, default=4.0, help="time cap per fine-tune")
    parser.add_argument("--recover", nargs="+", default=["mlp 25%"], help="pruned settings to fine-tune")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    args.settings = ["dense", *(n for n in args.settings if n != "dense")]
    if args.threads:
        torch.set_num_threads(args.threads)
        ENGINE["num_threads"] = args.threads
    args.work.mkdir(parents=True, exist_ok=True)

    stories = (TEXTS / "tinystories_valid.txt").read_text()
    half = len(stories) // 2
    calib_text = args.work / "calibration.txt"
    calib_text.write_text(stories[half:])
    texts = {
        "stories": stories[:120_000],
        "shakespeare": (TEXTS / "tinyshakespeare.txt").read_text()[:120_000],
    }

    paths = write_models(args, calib_text)
    rows = {}
    for name, path in paths.items():
        rows[name] = measure_quality(path, texts, args.windows)
        print(
            name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}, flush=True
        )
    speed = {} if args.no_speed else measure_speed(paths, stories[:20_000], args.repeats, args.decode_tokens)
    for name in speed:
        rows[name].update(speed[name])
        rows[name]["decode_speedup"] = (
            speed[name]["decode_tokens_per_s"] / speed["dense"]["decode_tokens_per_s"]
        )
        rows[name]["prefill_speedup"] = (
            speed[name]["prefill_tokens_per_s"] / speed["dense"]["prefill_tokens_per_s"]
        )
        print(name, {k: round(v, 2) for k, v in speed[name].items()}, flush=True)
    if args.recover_steps:
        for name in ["dense", *args.recover]:
            tuned = paths[name].with_name(paths[name].name + "_tuned")
            run = recover(
                paths[name], tuned, calib_text, args.recover_steps, args.recover_minutes, args.threads
            )
            rows[f"{name} + fine-tune"] = {**measure_quality(tuned, texts, args.windows), "fine_tune": run}
            print(f"{name} + fine-tune", rows[f"{name} + fine-tune"], flush=True)
    results = {
        "model": args.model.name,
        "settings": {name: SETTINGS[name] for name in args.settings},
        "threads": torch.get_num_threads(),
        "calibration": f"{args.num_samples} x {args.seq_len} tokens, second half of tinystories_valid.txt",
        "perplexity": f"{args.windows} windows of 512 tokens per text",
        "speed": "not measured (--no-speed)"
        if args.no_speed
        else f"median of {args.repeats} rounds; decode {args.decode_tokens} tokens after a 32-token prompt",
        "models": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
