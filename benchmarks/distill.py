"""Knowledge distillation vs plain training of the same student (``effinfer distill``, docs/distillation.md).

Splits a text of blank-line-separated stories into training stories (written as chunk files, since the
trainer holds out whole files for its own validation) and a held-out tail that no run sees, then runs
``effinfer distill`` twice with the very same flags and seed: once with the teacher (``--kd-weight W``)
and once with ``--kd-weight 0`` (plain next-token training, no teacher). Each student, and the teacher,
is scored with ``effinfer eval ppl`` on the held-out tail. Writes a JSON file with the commands, tokens,
wall times and perplexities.

    python benchmarks/distill.py --work /tmp/distill-bench --json docs/results/distill_stories260k.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from effinfer.cli import main as cli_main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def split_stories(text_path: Path, work: Path, heldout_fraction: float, stories_per_file: int) -> dict:
    """Training chunk files under work/train and the held-out tail as work/heldout.txt."""
    stories = [s.strip() for s in text_path.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    first_heldout = round(len(stories) * (1 - heldout_fraction))
    train_dir = work / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, first_heldout, stories_per_file):
        chunk = stories[start : min(start + stories_per_file, first_heldout)]
        (train_dir / f"stories{start:06d}.txt").write_text("\n\n".join(chunk) + "\n", encoding="utf-8")
    heldout = work / "heldout.txt"
    heldout.write_text("\n\n".join(stories[first_heldout:]) + "\n", encoding="utf-8")
    return {
        "stories": len(stories),
        "train_stories": first_heldout,
        "heldout_stories": len(stories) - first_heldout,
    }


def effinfer(argv: list[str]) -> tuple[str, float]:
    """Run an ``effinfer`` command in this process: (its stdout, wall seconds)."""
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = cli_main(argv)
    if code != 0:
        raise SystemExit(f"effinfer {shlex.join(argv)} exited with {code}")
    return out.getvalue(), time.perf_counter() - start


def heldout_perplexity(model: Path | str, heldout: Path, ctx: int) -> dict:
    argv = ["eval", "ppl", "--model", str(model), "--data", str(heldout), "--ctx", str(ctx)]
    argv += ["--dtype", "float32", "--device", "cpu"]
    printed, seconds = effinfer(argv)
    found = re.search(r"perplexity ([\d.]+) \(([\d.]+) nats/token\) over (\d+) tokens", printed)
    if not found:
        raise SystemExit(f"unexpected eval output: {printed!r}")
    return {
        "command": "effinfer " + shlex.join(argv),
        "perplexity": float(found[1]),
        "nll_per_token": float(found[2]),
        "tokens": int(found[3]),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(SHARED / "stories260K" / "hf"))
    p.add_argument("--text", default=str(SHARED / "text" / "tinystories_valid.txt"))
    p.add_argument("--work", required=True, help="scratch directory (data split, the two students)")
    p.add_argument("--heldout-fraction", type=float, default=0.15)
    p.add_argument("--stories-per-file", type=int, default=50)
    p.add_argument("--student", nargs="*", default=["--hidden-size", "32", "--layers", "5", "--heads", "4",
                   "--kv-heads", "2", "--intermediate-size", "96"], help="student model flags")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-loss", default="forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    split = split_stories(Path(args.text), work, args.heldout_fraction, args.stories_per_file)
    heldout = work / "heldout.txt"
    shared = ["distill", "--teacher", args.teacher, "--data", str(work / "train"), *args.student]
    shared += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    shared += ["--max-steps", str(args.max_steps), "--warmup-steps", str(max(1, args.max_steps // 20))]
    shared += ["--val-fraction", "0.05", "--eval-every", "0", "--save-every", "0", "--seed", str(args.seed)]
    shared += ["--threads", str(args.threads), "--save-dtype", "float32"]
    runs = {}
    for name, kd in (("distilled", ["--kd-weight", str(args.kd_weight), "--kd-temperature",
                                    str(args.kd_temperature), "--kd-loss", args.kd_loss]),
                     ("baseline", ["--kd-weight", "0"])):  # fmt: skip
        argv = [*shared, *kd, "--out", str(work / name)]
        print(f"$ effinfer {shlex.join(argv)}", file=sys.stderr)
        _, seconds = effinfer(argv)
        summary = json.loads((work / name / "train_summary.json").read_text())
        runs[name] = {
            "command": "effinfer " + shlex.join(argv),
            "wall_seconds": seconds,
            "tokens_seen": summary["tokens_seen"],
            "train_tokens_available": summary["data"]["train_tokens"],
            "parameters": summary["parameters"],
            "final_train_loss_last10": summary["train_loss_last10"],
            "trainer_val_loss": summary["val_loss"],
            "heldout": heldout_perplexity(work / name, heldout, args.seq_len),
        }
        print(json.dumps(runs[name], indent=1), file=sys.stderr)
    teacher = heldout_perplexity(args.teacher, heldout, args.seq_len)
    result = {"split": split, "teacher": teacher, **runs}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
