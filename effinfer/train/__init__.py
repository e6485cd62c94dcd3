"""``effinfer train``: pretrain a small Llama-architecture model from scratch, or fine-tune one.

From text files to an HF model directory in one command: collect and clean the files, hold out
some for validation, train a byte-level BPE tokenizer, pack the tokens into sequences, train
with AdamW and a warm-up + cosine schedule, evaluate on the held-out files, and export
config.json + model.safetensors + tokenizer that both effinfer and transformers load.

    effinfer train --data src/ --include "*.py" --out my-model --max-steps 2000
    effinfer train --data more/ --init my-model --out tuned --lr 3e-4     # fine-tune
    effinfer train --data src/ --out my-model --max-steps 2000 --resume    # continue after a stop
    torchrun --nproc_per_node 2 -m effinfer.train --data src/ --out my-model --batch-size 8

The modules: ``data`` (corpus, tokenizer, packing), ``model`` (init, optimizer, schedule),
``trainer`` (the loop, data parallelism, checkpoints) and ``export`` (the HF directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from effinfer.train.config import TrainConfig
from effinfer.train.trainer import Trainer

__all__ = ["main", "register", "build_parser", "TrainConfig", "Trainer"]


def _comma_list(values: list[str] | None) -> list[str]:
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def build_parser(prog: str = "effinfer train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""))
    add_arguments(parser)
    return parser


def register(subparsers) -> None:
    """Adds ``train`` to the ``effinfer`` subcommands."""
    parser = subparsers.add_parser(
        "train",
        help="train a small Llama model (also under torchrun)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(data=[], out=".")  # the defaults, in one place
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    data.add_argument(
        "--include", action="append", metavar="GLOBS", help='file-name patterns, e.g. "*.py,*.txt"'
    )
    data.add_argument(
        "--exclude",
        action="append",
        metavar="GLOBS",
        help='relative paths or directory names to skip, e.g. "test,tests"',
    )
    data.add_argument("--max-line-chars", type=int, default=d.max_line_chars, help="drop longer lines")
    data.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of files held out")
    data.add_argument(
        "--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary, incl. <|endoftext|>"
    )
    data.add_argument("--seq-len", type=int, default=d.seq_len)
    model = p.add_argument_group("model (ignored with --init)")
    model.add_argument("--hidden-size", type=int, default=d.hidden_size)
    model.add_argument("--layers", type=int, default=d.layers)
    model.add_argument("--heads", type=int, default=d.heads)
    model.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    model.add_argument(
        "--intermediate-size", type=int, default=None, help="default: ~8/3 hidden, multiple of 64"
    )
    model.add_argument("--tie-embeddings", action="store_true", help="share input embedding and output head")
    model.add_argument("--init", metavar="PATH", help="start from this HF model directory (fine-tuning)")
    opt = p.add_argument_group("optimization")
    opt.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per process per micro-step"
    )
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum)
    opt.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR / peak LR")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    opt.add_argument("--max-steps", type=int, default=d.max_steps, help="length of the LR schedule")
    opt.add_argument("--stop-after", type=int, help="stop at this step (resume later with --resume)")
    opt.add_argument("--max-time-minutes", type=float, help="stop (and export) after this much wall time")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 disables")
    opt.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision, help="autocast dtype")
    opt.add_argument("--seed", type=int, default=d.seed)
    opt.add_argument("--threads", type=int, help="torch CPU threads per process")
    opt.add_argument("--compile", action="store_true", help="torch.compile the training step (slower start)")
    run = p.add_argument_group("evaluation and output")
    run.add_argument(
        "--out", required=True, help="output HF model directory (training state in OUT/training)"
    )
    run.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations"
    )
    run.add_argument("--eval-batches", type=int, default=d.eval_batches)
    run.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from OUT/training/checkpoint.pt")
    run.add_argument("--save-dtype", choices=["bfloat16", "float32"], default=d.save_dtype)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(
    args: argparse.Namespace,
    config_class: type[TrainConfig] = TrainConfig,
    trainer_class: type[Trainer] = Trainer,
    command: str = "effinfer train",
) -> int:
    """Build the config from the flags and train; ``effinfer distill`` passes its own config and trainer."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    options = {key: value for key, value in vars(args).items() if key in fields}
    options["include"] = _comma_list(args.include)
    options["exclude"] = _comma_list(args.exclude)
    try:
        config = config_class(**options)
        trainer_class(config).run()
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
