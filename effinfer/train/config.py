"""``TrainConfig``: every setting of a training run, checked once when it is built.

The command line (``effinfer.train.main``) maps one flag to each field; the defaults live here only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

# The byte-level BPE starts from 256 byte tokens plus <|endoftext|> (``bpe.train_tokenizer``).
MIN_VOCAB_SIZE = 257


@dataclass
class TrainConfig:
    data: list[str]
    out: Path
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    max_line_chars: int = 1000
    val_fraction: float = 0.05
    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None  # None: as many as query heads
    intermediate_size: int | None = None  # None: about 8/3 of hidden, a multiple of 64
    tie_embeddings: bool = False
    seq_len: int = 256
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    stop_after: int | None = None  # stop (and checkpoint) at this step of the max_steps schedule
    max_time_minutes: float | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    seed: int = 0
    init: Path | None = None
    tokenizer_dir: Path | None = None  # encode the data with this HF tokenizer (default: --init's)
    resume: bool = False
    save_dtype: str = "bfloat16"
    precision: str = "bf16"
    threads: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.init = Path(self.init) if self.init else None
        self.tokenizer_dir = Path(self.tokenizer_dir) if self.tokenizer_dir else None
        self.kv_heads = self.heads if self.kv_heads is None else self.kv_heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "layers", "heads", "hidden_size")
        positive += ("kv_heads", "intermediate_size", "eval_batches", "max_line_chars")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("threads", "stop_after"):  # optional, but at least 1 when given
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):  # 0: off
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.max_time_minutes is not None and not self.max_time_minutes > 0:
            raise ValueError(f"--max-time-minutes must be positive, got {self.max_time_minutes}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 byte tokens and <|endoftext|>), "
                f"got {self.vocab_size}"
            )
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {str(self.out)!r} is an existing file, not a directory")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.save_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--save-dtype must be bfloat16 or float32, got {self.save_dtype!r}")
        if self.init is not None and not self.init.is_dir():
            raise ValueError(f"--init {str(self.init)!r} does not exist or is not a directory")
        if self.init is not None and not (self.init / "config.json").is_file():
            raise ValueError(f"--init {self.init} is not an HF model directory (no config.json)")
