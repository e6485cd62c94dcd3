"""Pruning quality: magnitude vs Wanda vs SparseGPT at 50% and N:M on a real model (CPU).

For every method and sparsity runs ``effinfer prune`` (the command's own code) into WORK, checks
that the saved checkpoint is as sparse as asked (every pruned matrix >= the asked share of zeros;
N:M: at most N non-zeros in every M consecutive inputs), and measures held-out perplexity the way
``effinfer eval ppl --ctx C --max-windows W --dtype float32`` does, with the unpruned model as the
baseline (dequantized and saved the same way). Checkpoints already in WORK are reused. Writes a JSON file, a Markdown table and a plot.

    python benchmarks/pruning.py --model ~/.cache/effinfer-models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib ../shared/data/text/tinystories_train_lowercase.txt \\
        --eval ../shared/data/text/tinystories_valid.txt --work /tmp/prune \\
        --json docs/results/pruning_smollm2.json --plot docs/pruning_smollm2.png
    python benchmarks/pruning.py ... --layer-error 15 --json docs/results/pruning_smollm2_layer15.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from effinfer import LLM
from effinfer.cli import main as cli_main
from effinfer.compress.calibration import run_layerwise
from effinfer.compress.prune.magnitude import prune_weight_magnitude
from effinfer.compress.prune.masks import SparsityPattern
from effinfer.compress.prune.pipeline import PruneOptions, calibration_rows, load_source, save_pruned
from effinfer.compress.prune.sparsegpt import sparsegpt_prune_weight
from effinfer.compress.prune.wanda import prune_weight_wanda
from effinfer.eval.perplexity import perplexity

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def checkpoint_sparsity(directory: Path, pattern: SparsityPattern) -> dict:
    """The smallest share of zeros over the pruned matrices, and whether every one follows N:M."""
    shares, n_m_ok = [], True
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if not name.removesuffix(".weight").endswith(PROJECTIONS):
                continue
            weight = f.get_tensor(name)
            shares.append(float((weight == 0).double().mean()))
            if pattern.is_n_m:
                groups = (weight != 0).reshape(weight.shape[0], -1, pattern.m).sum(-1)
                n_m_ok &= bool((groups <= pattern.n).all())
    return {
        "matrices": len(shares),
        "min_zero_share": min(shares),
        "n_m_ok": n_m_ok if pattern.is_n_m else None,
    }


def held_out_perplexity(
    model: Path, text: Path, ctx: int, max_windows: int, threads: int | None = None
) -> float:
    llm = LLM(str(model), dtype="float32", device="cpu", num_threads=threads, show_progress=False)
    return perplexity(llm, path=text, ctx=ctx, max_windows=max_windows, show_progress=False).perplexity


class _LayerDone(Exception):
    pass


def layer_errors(model: str, calib: str, layer_index: int, num_samples: int, seq_len: int) -> dict:
    """Relative output error ||XWᵀ - XŴᵀ|| / ||XWᵀ|| of each Linear of one decoder layer, per method
    and sparsity, on the real inputs that layer sees in the dense model (a cheap stand-in for the
    whole-model run when SparseGPT's column loop is too slow for the machine)."""
    source = load_source(Path(model).expanduser(), show_progress=False)
    ids = calibration_rows(
        source.tokenizer, PruneOptions("wanda", SparsityPattern(0.5), calib, num_samples, seq_len)
    )
    results = {}

    def measure(step) -> None:
        if step.index < layer_index:
            return
        inputs = step.capture(step.linears)
        for name, linear in step.linears.items():
            w, x = linear.weight.data.double(), inputs[name].double()
            reference = x @ w.T
            for sparsity in ("0.5", "2:4"):
                pattern = SparsityPattern.parse(sparsity)
                magnitude, wanda = w.clone(), w.clone()
                prune_weight_magnitude(magnitude, pattern)
                prune_weight_wanda(wanda, x.norm(dim=0), pattern)
                sparsegpt = sparsegpt_prune_weight(w, 2 * x.T @ x / len(x), pattern)
                pruned = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
                results[f"{name} {sparsity}"] = {
                    method: (torch.linalg.norm(reference - x @ v.T) / torch.linalg.norm(reference)).item()
                    for method, v in pruned.items()
                }
                print(name, sparsity, results[f"{name} {sparsity}"], flush=True)
        raise _LayerDone

    try:
        run_layerwise(source.model, ids, measure, show_progress=False)
    except _LayerDone:
        pass
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF directory or GGUF file")
    parser.add_argument("--calib", required=True, help="calibration text")
    parser.add_argument("--eval", required=True, help="held-out text (not the calibration text)")
    parser.add_argument("--work", type=Path, required=True, help="where the pruned checkpoints go")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.5,2:4,4:8")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, help="CPU threads (1 on a busy shared machine)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--layer-error", type=int, metavar="L",
                        help="only measure each method's output error on decoder layer L's real inputs")  # fmt: skip
    args = parser.parse_args()
    if args.layer_error is not None:
        errors = layer_errors(args.model, args.calib, args.layer_error, args.num_samples, args.seq_len)
        if args.json:
            args.json.write_text(json.dumps(errors, indent=2) + "\n")
        return
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_args = dict(text=Path(args.eval), ctx=args.ctx, max_windows=args.max_windows, threads=args.threads)
    # Rows an earlier run measured with the same settings are kept (the runs are long on a CPU).
    done = {}
    if args.json and args.json.is_file():
        earlier = json.loads(args.json.read_text())
        same = all(earlier["args"].get(k) == getattr(args, k) for k in ("model", "calib", "eval", "ctx",
                   "max_windows", "num_samples", "seq_len"))  # fmt: skip
        done = {(r["method"], r["sparsity"]): r for r in earlier["rows"]} if same else {}
    # The baseline goes through the same loading (dequantized) and saving (its dtype) as the pruned ones.
    dense = args.work / "dense"
    if not (dense / "model.safetensors").is_file():
        save_pruned(load_source(Path(args.model).expanduser()), dense, {"method": "none"})
    start = time.perf_counter()
    rows = [done.get(("dense", "0")) or {"method": "dense", "sparsity": "0",
            "perplexity": held_out_perplexity(dense, **eval_args), "eval_seconds": time.perf_counter() - start}]  # fmt: skip
    print(rows[0], flush=True)
    for sparsity in args.sparsities.split(","):
        pattern = SparsityPattern.parse(sparsity)
        for method in args.methods.split(","):
            out = args.work / f"{method}-{sparsity.replace(':', 'of')}"
            if (method, sparsity) in done:
                rows.append(done[(method, sparsity)])
                save_rows(args, rows)  # a row kept from an earlier run stays in the file
                continue
            row = {"method": method, "sparsity": sparsity}
            if not (out / "model.safetensors").is_file():
                command = ["prune", "--model", args.model, "--method", method, "--sparsity", sparsity,
                           "--calib", args.calib, "--num-samples", str(args.num_samples),
                           "--seq-len", str(args.seq_len), "--out", str(out)]  # fmt: skip
                start = time.perf_counter()
                if cli_main(command) != 0:
                    raise SystemExit(f"effinfer {' '.join(command)} failed")
                row["prune_seconds"] = time.perf_counter() - start
            row.update(checkpoint_sparsity(out, pattern))
            start = time.perf_counter()
            row["perplexity"] = held_out_perplexity(out, **eval_args)
            row["eval_seconds"] = time.perf_counter() - start
            rows.append(row)
            print(row, flush=True)
            save_rows(args, rows)
    print(markdown_table(rows))
    if args.plot:
        plot(rows, args.plot, f"Pruning {Path(args.model).name}")


def save_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"work": str(args.work), "json": str(args.json),
                             "plot": str(args.plot)}, "rows": rows}, indent=2) + "\n")  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    dense = rows[0]["perplexity"]
    lines = ["| method | sparsity | perplexity | vs dense | smallest zero share of a matrix | N:M holds |",
             "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for row in rows:
        share = f"{row['min_zero_share']:.1%}" if "min_zero_share" in row else "-"
        n_m = {True: "yes", False: "NO", None: "-"}[row.get("n_m_ok")]
        lines.append(f"| {row['method']} | {row['sparsity']} | {row['perplexity']:.2f} | "
                     f"{row['perplexity'] / dense:.2f}x | {share} | {n_m} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsities = list(dict.fromkeys(r["sparsity"] for r in rows[1:]))
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, method in enumerate(methods):
        values = [next((r["perplexity"] for r in rows if r["method"] == method and r["sparsity"] == s), 0)
                  for s in sparsities]  # fmt: skip
        bars = ax.bar([x + i * width for x in range(len(sparsities))], values, width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(
        rows[0]["perplexity"], color="black", linestyle="--", label=f"dense {rows[0]['perplexity']:.1f}"
    )
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(sparsities))])
    ax.set_xticklabels([f"{s} unstructured" if ":" not in s else s for s in sparsities])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
