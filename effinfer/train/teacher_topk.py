"""``effinfer distill --teacher-topk K``: the teacher's top-K log-probabilities cached on disk.

Papers: the sparse (top-K) teacher follows the cached-logit practice of large-scale distillation
(e.g. Raman et al. 2023, "For Distillation, Tokens Are Not All You Need"; Gemma 2's and Llama 3.2's
offline-logit distillation). Idea: when the teacher is expensive, run it once over every training
row the run will read (through effinfer's engine, prompt-style prefill with its own kernels) and keep,
per position, the K most likely tokens' log-probabilities at ``--kd-temperature`` (float16), their ids
(int32) and the log of the probability mass of all other tokens (float32). Training then never runs
the teacher. The KL is taken between the teacher's and the student's distributions coarsened to K + 1
outcomes (the K cached tokens and "all the rest"): exact when K covers the vocabulary, otherwise a
lower bound of the full KL (data processing inequality) that still pulls the student's tail mass to
the teacher's.

    effinfer distill --teacher T.gguf --data code/ --out draft --teacher-topk 64 ...

The cache lives in ``OUT/training/teacher-topk`` (or ``--teacher-cache DIR``), is filled in order and
resumes where an interrupted pass stopped; rows are found by their tokens (a hash of the row), so any
order, process count or resume reads the right entries. A cache made with another teacher, K,
temperature or other rows is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from effinfer.engine.llm import LLM
from effinfer.models.base import CausalLM

# Rows between two flushes of the cache files and of the progress count.
FLUSH_EVERY = 16
# A teacher tail whose log-mass underflows is held at this finite floor, so no 0 * inf ever appears.
MIN_TAIL_LOG_MASS = -1e4


class TeacherTopK(NamedTuple):
    """The teacher's sparse next-token distribution at each position ([..., K] and [...])."""

    log_probs: torch.Tensor  # of the K likeliest tokens, at the distillation temperature
    ids: torch.Tensor
    tail_log_mass: torch.Tensor  # log of the probability of all other tokens (-inf when K = vocab)


def top_k_log_probs(logits: torch.Tensor, top_k: int, temperature: float) -> TeacherTopK:
    """The ``top_k`` likeliest tokens of ``logits`` [..., vocab] at temperature T, and the rest's mass.

    The log-softmax runs in float32 over the whole vocabulary.
    """
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = log_probs.topk(top_k, dim=-1)
    if top_k == log_probs.shape[-1]:
        tail = torch.full(values.shape[:-1], float("-inf"), device=values.device)
    else:
        tail = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TeacherTopK(values, ids, tail)


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    targets: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    kd_loss: str = "forward",
) -> torch.Tensor:
    """``distillation_loss`` against a cached top-K teacher: KL over the K tokens plus the tail bucket.

    Student and teacher are both reduced to K + 1 outcomes: each cached token, and the mass of every
    other token (the teacher's is cached; the student's is its softmax mass outside the K ids). With K
    equal to the vocabulary this is the full KL, so the loss equals the on-the-fly one.
    """
    student_logits = student_logits.float()
    # Cross-entropy from the log-sum-exp, which T = 1 shares with the KL: no second [N, vocab] tensor.
    log_z = student_logits.logsumexp(-1)
    cross_entropy = (log_z - student_logits.gather(-1, targets[..., None])[..., 0]).mean()
    scaled = student_logits if temperature == 1 else student_logits / temperature
    log_norm = log_z if temperature == 1 else scaled.logsumexp(-1)
    student_top = scaled.gather(-1, teacher.ids) - log_norm[..., None]
    teacher_top = teacher.log_probs.float()
    if kd_loss == "forward":
        kl = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    else:
        kl = (student_top.exp() * (student_top - teacher_top)).sum(-1)
    if teacher.ids.shape[-1] < student_logits.shape[-1]:
        # Exact log-mass outside the cached ids (no 1 - sum cancellation when it is small).
        student_tail = scaled.scatter(-1, teacher.ids, float("-inf")).logsumexp(-1) - log_norm
        teacher_tail = teacher.tail_log_mass.float().clamp(min=MIN_TAIL_LOG_MASS)
        if kd_loss == "forward":
            kl = kl + teacher_tail.exp() * (teacher_tail - student_tail)
        else:
            kl = kl + student_tail.exp() * (student_tail - teacher_tail)
    return kd_weight * temperature**2 * kl.mean() + (1.0 - kd_weight) * cross_entropy


def row_key(tokens: np.ndarray) -> bytes:
    """The cache key of one row of input tokens: a hash of their int64 values."""
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class TeacherTopKCache:
    """The files of one cache: ``values`` [rows, seq_len, K] float16, ``ids`` int32, ``tail`` float32.

    ``meta.json`` names what the cache was made from (``settings``) and how many rows are done.
    """

    FILES = {"values": np.float16, "ids": np.int32, "tail": np.float32}

    def __init__(self, directory: Path, settings: dict, num_rows: int, seq_len: int, top_k: int) -> None:
        self.directory = Path(directory)
        self.settings = settings
        self.shape = (num_rows, seq_len, top_k)
        meta = self._read_meta()
        files_present = all((self.directory / f"{name}.npy").is_file() for name in self.FILES)
        fresh = meta is None or meta.get("settings") != settings or not files_present
        if fresh:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.rows_done = 0
            self._write_meta()  # before the arrays: a half-written cache never passes for another one
        else:
            self.rows_done = int(meta["rows_done"])
        mode = "w+" if fresh else "r+"
        self.arrays = {
            name: np.lib.format.open_memmap(
                self.directory / f"{name}.npy",
                mode=mode,
                dtype=dtype,
                shape=self.shape if name != "tail" else self.shape[:2],
            )
            for name, dtype in self.FILES.items()
        }

    @property
    def complete(self) -> bool:
        return self.rows_done == self.shape[0]

    def _read_meta(self) -> dict | None:
        path = self.directory / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_meta(self) -> None:
        meta = {"settings": self.settings, "rows_done": self.rows_done, "shape": list(self.shape)}
        tmp = self.directory / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        tmp.replace(self.directory / "meta.json")

    def write(self, row: int, teacher: TeacherTopK) -> None:
        """Store one row; rows are written in order, and ``rows_done`` is saved every ``FLUSH_EVERY``."""
        if row != self.rows_done:
            raise ValueError(
                f"teacher cache rows are written in order: expected row {self.rows_done}, got {row}"
            )
        self.arrays["values"][row] = teacher.log_probs.cpu().to(torch.float16).numpy()
        self.arrays["ids"][row] = teacher.ids.cpu().to(torch.int32).numpy()
        self.arrays["tail"][row] = teacher.tail_log_mass.cpu().float().numpy()
        self.rows_done += 1
        if self.rows_done % FLUSH_EVERY == 0 or self.complete:
            self.flush()

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self._write_meta()


def build_teacher_cache(
    teacher: str | os.PathLike,
    rows: np.ndarray,
    directory: Path,
    top_k: int,
    temperature: float,
    threads: int | None = None,
    show_progress: bool = True,
) -> TeacherTopKCache:
    """Run the teacher once over ``rows`` ([n, seq_len] input tokens) and cache its top-K; resumes a partial cache.

    The teacher runs through effinfer's engine in its serving dtype and kernels (a GGUF stays quantized),
    each row one prefill of ``seq_len`` tokens through the paged KV cache, as the target of speculative
    decoding computes them.
    """
    num_rows, seq_len = rows.shape
    teacher_path = Path(teacher).resolve()
    settings = {
        "teacher": str(teacher_path),
        "teacher_bytes": teacher_path.stat().st_size if teacher_path.is_file() else None,
        "top_k": top_k,
        "temperature": temperature,
        "seq_len": seq_len,
        "rows_sha256": hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest(),
    }
    cache = TeacherTopKCache(directory, settings, num_rows, seq_len, top_k)
    if cache.complete:
        return cache
    kv_bytes = 64 * 2**20  # one row of context at a time
    # The scored rows' positions stop at seq_len - 1 (the extra token below is never run).
    llm = LLM(teacher_path, max_model_len=seq_len, kv_cache_memory=kv_bytes, num_threads=threads,
              show_progress=False)  # fmt: skip
    vocab = llm.engine.model_config.vocab_size
    if top_k > vocab:
        raise ValueError(f"--teacher-topk {top_k} exceeds the teacher's vocabulary of {vocab} tokens")
    bar = tqdm(
        total=num_rows, initial=cache.rows_done, desc="teacher top-k", unit="row", disable=not show_progress
    )
    with bar:
        for row in range(cache.rows_done, num_rows):
            # One extra token: teacher_forced_logits scores every token but the last.
            tokens = [*rows[row].tolist(), 0]
            logits = torch.cat(list(llm.engine.teacher_forced_logits(tokens, chunk=seq_len)))
            cache.write(row, top_k_log_probs(logits, top_k, temperature))
            bar.update(1)
    cache.flush()
    return cache


class CachedTeacher:
    """The cached teacher of a batch of rows: (top-K log-probs, ids, tail log-mass), found by each row's tokens."""

    def __init__(self, cache: TeacherTopKCache, rows: np.ndarray) -> None:
        if not cache.complete:
            raise ValueError(f"the teacher cache in {cache.directory} is incomplete ({cache.rows_done} rows)")
        self.cache = cache
        self.slot = {row_key(tokens): i for i, tokens in enumerate(rows)}

    def __call__(self, inputs: torch.Tensor) -> TeacherTopK:
        try:
            slots = [self.slot[row_key(tokens)] for tokens in inputs.cpu().numpy()]
        except KeyError:
            raise ValueError(
                f"a training row is missing from the teacher cache in {self.cache.directory}; delete it to rebuild"
            ) from None
        arrays = self.cache.arrays
        device = inputs.device
        values = torch.from_numpy(arrays["values"][slots]).to(device)
        ids = torch.from_numpy(arrays["ids"][slots].astype(np.int64)).to(device)
        tail = torch.from_numpy(arrays["tail"][slots]).to(device)
        return TeacherTopK(values, ids, tail)


class CachedDistillationLoss(nn.Module):
    """``loss(inputs, targets)`` of the student against the cached top-K teacher (``NextTokenLoss``'s interface)."""

    def __init__(
        self, model: CausalLM, teacher: CachedTeacher, kd_weight: float, temperature: float, kd_loss: str
    ) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.kd_weight, self.temperature, self.kd_loss = kd_weight, temperature, kd_loss

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        student_logits = self.model.compute_logits(self.model.forward_dense(inputs))
        return sparse_distillation_loss(
            student_logits, self.teacher(inputs), targets, self.kd_weight, self.temperature, self.kd_loss
        )
