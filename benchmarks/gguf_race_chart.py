"""One chart of several ``effinfer bench gguf --json`` results: effinfer / llama.cpp per file.

    python benchmarks/gguf_race_chart.py docs/results/gguf_race_*.json --out docs/gguf_race.png

Bars per file: batch-1 decode (tg), prefill (pp) and concurrent serving, each as effinfer's tokens/s
over llama.cpp's from the same run; the line at 1.0 is parity. Prefill ratios are far larger than
the others, so the axis is logarithmic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratios(result: dict) -> dict[str, float]:
    ours, theirs, s = result["effinfer"], result["llama.cpp"], result["settings"]
    out = {
        f"decode tg{s['decode_tokens']}": ours["decode"]["mean"] / theirs["decode"]["mean"],
        f"prefill pp{s['prefill_tokens']}": ours["prefill"]["mean"] / theirs["prefill"]["mean"],
    }
    if result.get("serving"):
        a, b = (result["serving"][k]["report"]["output_throughput"] for k in ("llama.cpp", "effinfer"))
        out[f"{s['concurrent']} streams"] = b / a
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", nargs="+", type=Path, help="JSON files written by effinfer bench gguf --json"
    )
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in args.results]
    per_file = [ratios(r) for r in results]
    kinds = list(dict.fromkeys(k for r in per_file for k in r))
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, kind in enumerate(kinds):
        xs = [f + (i - (len(kinds) - 1) / 2) * width for f in range(len(results))]
        values = [r.get(kind, float("nan")) for r in per_file]
        bars = ax.bar(xs, values, width, label=kind)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(results)), [r["file"].removesuffix(".gguf") for r in results], fontsize=8)
    ax.set_ylabel("effinfer / llama.cpp (tokens/s, log)")
    ax.set_title(f"effinfer vs llama.cpp on GGUF files ({results[0]['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
