"""Quality of every quantization method in one table: perplexity on held-out text, float vs quantized.

Each row runs the real pipeline a user runs: ``effinfer quantize`` (the same ``quantize()``
function) writes a checkpoint, ``LLM(OUT)`` loads it, and sliding-window perplexity is measured
on text the calibration never saw. Models:

- ``default``: the built-in default model; calibration on the held-out files in
  ``effinfer/data/heldout/calibration.txt``, evaluation on ``evaluation.txt`` (ctx 512).
- ``stories260k``: ``../shared/data/stories260K/hf``; calibration on the last 200 KB of
  ``text/tinystories_valid.txt`` (256 rows), evaluation on its first 100 windows of 512 tokens
  (group 32, since its rows are only 64 wide).

    python benchmarks/quant_quality.py --model default --markdown docs/quantization.md --plot docs/quant_quality.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from effinfer import LLM  # noqa: E402
from effinfer.compress.quant.pipeline import QuantizeOptions, quantize  # noqa: E402
from effinfer.default_model import default_model_path, heldout_text_path  # noqa: E402
from effinfer.eval.perplexity import perplexity  # noqa: E402


@dataclass
class Row:
    label: str
    options: QuantizeOptions | None  # None: the float model itself
    engine: dict  # extra LLM arguments (e.g. kv_cache_dtype)


def rows_for(group: int) -> list[Row]:
    q = QuantizeOptions
    return [
        Row("bf16 (baseline)", None, {}),
        Row("RTN int8, per channel", q("rtn", 8, None, True), {}),
        Row(f"RTN int4, g{group}", q("rtn", 4, group, False), {}),
        Row(f"GPTQ int4, g{group}, no act-order", q("gptq", 4, group, False, act_order=False), {}),
        Row(f"GPTQ int4, g{group}, act-order (default)", q("gptq", 4, group, False, act_order=True), {}),
        Row(f"AWQ int4, g{group}", q("awq", 4, group, False), {}),
        Row("naive W8A8 (per-tensor activations)", q("w8a8-naive", 8, None, True), {}),
        Row("SmoothQuant W8A8, alpha 0.5", q("smoothquant", 8, None, True), {}),
        Row("bf16, scored through the paged KV cache", None, {"paged": True}),
        Row(
            "KV cache int8, scored through the paged KV cache",
            None,
            {"paged": True, "kv_cache_dtype": "int8"},
        ),
        # bitsandbytes-style methods, at bitsandbytes' block size of 64 (RTN at the same block size)
        Row("RTN int4, g64, symmetric (absmax)", q("rtn", 4, 64, True), {}),
        Row("RTN int4, g64, asymmetric", q("rtn", 4, 64, False), {}),
        Row("NF4, block 64", q("nf4", 4, 64, True), {}),
        Row("NF4, block 64, double quant", q("nf4", 4, 64, True, double_quant=True), {}),
        Row("FP4, block 64", q("fp4", 4, 64, True), {}),
        Row("LLM.int8(), threshold 6", q("llm_int8", 8, None, True), {}),
    ]


def model_setup(name: str, shared: Path) -> tuple[Path, Path, str, dict]:
    """(model dir, calibration file, evaluation text, perplexity settings)."""
    if name == "default":
        text = heldout_text_path("evaluation").read_text()
        return default_model_path(), heldout_text_path("calibration"), text, {"ctx": 512}
    model = shared / "stories260K" / "hf"
    valid = (shared / "text" / "tinystories_valid.txt").read_text()
    calib = Path(tempfile.mkdtemp()) / "calib.txt"
    calib.write_text(valid[-200_000:])
    return model, calib, valid[:-200_000], {"ctx": 512, "max_windows": 100}


def evaluate(model: Path, text: str, ppl_args: dict, engine: dict) -> float:
    engine = dict(engine)
    paged = engine.pop("paged", False)
    llm = LLM(str(model), dtype="bfloat16", show_progress=False, **engine)
    if paged:
        # Token by token through the cache (chunk 16: each token after a window's first 16 reads
        # its whole context back from the cache, as in decoding), so KV-cache schemes show.
        from effinfer.eval.perplexity import paged_perplexity

        return paged_perplexity(llm, text=text, show_progress=False, chunk=16, **ppl_args).perplexity
    return perplexity(llm, text=text, show_progress=False, **ppl_args).perplexity


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "stories260k"), default="default")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--only", help="comma-separated row numbers to run (0 is the baseline)")
    parser.add_argument("--markdown", help="append the table to this file")
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--plot", help="bar chart of the perplexity increase (png)")
    args = parser.parse_args()

    model, calib, text, ppl_args = model_setup(args.model, Path(args.shared))
    group = 128 if args.model == "default" else 32
    # Calibration rows of 512 tokens (overlapping when the text is short). The 260K-parameter
    # model's AWQ search is noisy with 128 rows (it removes ~31% of RTN's increase); 256 settle it.
    num_samples = 128 if args.model == "default" else 256
    rows = rows_for(group)
    kv_rows = {i for i, r in enumerate(rows) if r.engine.get("paged")}
    chosen = {0} | ({int(i) for i in args.only.split(",")} if args.only else set(range(len(rows))))
    if chosen & kv_rows:
        chosen |= kv_rows  # the int8-KV row needs its paged bf16 reference
    results = []
    base = paged_base = None
    for index, row in enumerate(rows):
        if index not in chosen:
            continue
        print(f"--- {row.label}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if row.options is None:
            ppl = evaluate(model, text, ppl_args, row.engine)
        else:
            row.options.calib = calib
            row.options.num_samples = num_samples
            with tempfile.TemporaryDirectory() as out:
                quantize(model, out, row.options, show_progress=True)
                ppl = evaluate(Path(out), text, ppl_args, row.engine)
        seconds = time.perf_counter() - start
        base = ppl if base is None else base
        if row.engine.get("paged") and not row.engine.get("kv_cache_dtype"):
            paged_base = ppl
        # KV-cache rows compare with bf16 scored the same way (through the cache).
        ref = paged_base if row.engine.get("kv_cache_dtype") else base
        results.append({"method": row.label, "perplexity": ppl, "increase_pct": 100 * (ppl / ref - 1),
                        "seconds": seconds})  # fmt: skip
        print(f"{row.label}: {ppl:.4f} ({100 * (ppl / ref - 1):+.2f}%) in {seconds:.0f} s", flush=True)

    lines = [
        f"Model: {args.model} (`{model.name}`), evaluation {ppl_args}, activations bf16, "
        f"calibration {num_samples} rows of 512 tokens; "
        f"command: `python benchmarks/quant_quality.py --model {args.model}`",
        "",
        "| method | perplexity | vs bf16 (KV rows: vs bf16 through the cache) | quantize + eval time |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['perplexity']:.3f} | {r['increase_pct']:+.2f}% | {r['seconds']:.0f} s |"
        )
    rtn = next((r for r in results if r["method"].startswith("RTN int4")), None)
    if rtn and rtn["increase_pct"] > 0:
        lines.append("")
        for r in results:
            if r["method"].startswith(("GPTQ", "AWQ")):
                cut = 1 - r["increase_pct"] / rtn["increase_pct"]
                lines.append(f"- {r['method']} removes {100 * cut:.0f}% of RTN int4's perplexity increase.")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.45 * len(results) + 1.5))
        labels = [r["method"] for r in results][::-1]
        values = [r["increase_pct"] for r in results][::-1]
        ax.barh(labels, values, color=["tab:green" if v < 1 else "tab:red" for v in values])
        ax.set_xlabel("perplexity increase over bf16 (%) — lower is better")
        ax.set_title(f"Quantization quality, {args.model} model")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
