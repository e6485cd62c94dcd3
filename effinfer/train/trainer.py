"""The training loop: data-parallel, resumable, reproducible.

Each optimizer step reads one global batch of ``batch_size x world_size x grad_accum`` rows,
chosen by position in a seeded per-epoch permutation (``data.RowOrder``). Micro-step m of rank
r takes slice [m, r] of it, so two processes with half the batch compute the same mean loss
over the same rows as one process with the whole batch. Gradients are averaged across
processes by ``DistributedDataParallel`` (Li et al. 2020, gloo on CPU, NCCL on GPU) when the
run is launched with ``torchrun``; only rank 0 writes files and shows progress.

A checkpoint holds the model, optimizer, scheduler, RNG states and the position in the data,
so ``--resume`` continues the very same loss curve. Forward passes run under bf16 autocast
(``--precision fp32`` turns it off); parameters, optimizer state and the softmax stay float32.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from effinfer.train.bpe import SEPARATOR
from effinfer.train.config import TrainConfig
from effinfer.train.data import DataSettings, PackedTokens, RowOrder, prepare_data
from effinfer.train.distributed import init_distributed
from effinfer.train.export import export_hf
from effinfer.train.model import (
    NextTokenLoss,
    build_model,
    build_optimizer,
    build_scheduler,
    count_parameters,
    load_init_model,
    scratch_hf_config,
)
from effinfer.train.summary import hardware_description, summary_markdown


class Trainer:
    """One training run: builds data, model and optimizer from a ``TrainConfig``; ``run()`` trains and exports."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = cfg = config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = init_distributed()
        self.device = self.dist.device
        self.state_dir = cfg.out / "training"
        self.data_dir = self.state_dir / "data"
        self.checkpoint_path = self.state_dir / "checkpoint.pt"
        settings = DataSettings(
            sources=[str(s) for s in cfg.data],
            include=cfg.include,
            exclude=cfg.exclude,
            vocab_size=cfg.vocab_size,
            max_line_chars=cfg.max_line_chars,
            val_fraction=cfg.val_fraction,
            seq_len=cfg.seq_len,
            init=str(cfg.tokenizer_dir or cfg.init) if cfg.tokenizer_dir or cfg.init else None,
        )
        # Rank 0 tokenizes; the others wait and then read its cache.
        if self.dist.is_main:
            self.corpus = prepare_data(settings, self.data_dir)
        self.dist.barrier()
        if not self.dist.is_main:
            self.corpus = prepare_data(settings, self.data_dir)
        self.train_data = PackedTokens(self.data_dir / "train.npy", cfg.seq_len)
        self.val_data = PackedTokens(self.data_dir / "val.npy", cfg.seq_len)
        self.order = RowOrder(self.train_data.num_rows, cfg.seed)
        self.global_batch = cfg.batch_size * self.dist.world_size * cfg.grad_accum

        checkpoint = self._read_checkpoint() if cfg.resume else None
        if cfg.init is not None and checkpoint is None:
            self.model, self.hf_config = load_init_model(cfg.init, cfg.seq_len, self.device)
        else:
            self.hf_config = checkpoint["hf_config"] if checkpoint else self._scratch_config()
            self.model = build_model(self.hf_config, cfg.seq_len, self.device, cfg.seed)
        self.model.train()
        # The loss holds the model, and any parameters it learns besides (distillation's projection).
        self.objective = self.build_loss()
        self.loss_fn: torch.nn.Module = self.objective
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_fn = DistributedDataParallel(self.loss_fn, device_ids=device_ids)
        # Fuses the many small element-wise ops (norms, rotary, SwiGLU) that dominate a tiny model's step.
        self.compiled_loss = torch.compile(self.loss_fn) if cfg.compile else self.loss_fn
        self.optimizer = build_optimizer(self.objective, cfg.lr, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        self.step = 0
        self.position = 0  # training rows consumed so far
        self.history: dict[str, list] = {"loss": [], "lr": [], "seconds": [], "eval": []}
        self.tokens_seen = 0
        self.train_seconds = 0.0
        if checkpoint is not None:
            self._restore(checkpoint)

    def build_loss(self) -> torch.nn.Module:
        """The objective of ``loss(inputs, targets)``; a subclass brings its own (``distill.py``'s KD loss)."""
        return NextTokenLoss(self.model)

    def _scratch_config(self) -> dict:
        cfg = self.cfg
        return scratch_hf_config(
            vocab_size=self.corpus.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.layers,
            num_heads=cfg.heads,
            num_kv_heads=cfg.kv_heads,
            intermediate_size=cfg.intermediate_size,
            max_positions=cfg.seq_len,
            tie_embeddings=cfg.tie_embeddings,
            separator_id=self.corpus.separator_id,
        )

    # ---------------------------------------------------------------- the loop

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def train_step(self) -> float:
        """One optimizer step over the next global batch; returns its mean loss over all processes."""
        cfg, rank = self.cfg, self.dist.rank
        rows = self.order.take(self.position, self.global_batch)
        rows = rows.reshape(cfg.grad_accum, self.dist.world_size, cfg.batch_size)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = self.train_data.rows(rows[micro, rank]).to(self.device, non_blocking=True)
            last = micro == cfg.grad_accum - 1
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = nullcontext() if last or self.dist.world_size == 1 else self.loss_fn.no_sync()
            with sync:
                with self._autocast():
                    loss = self.compiled_loss(batch[:, :-1], batch[:, 1:])
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += self.global_batch
        self.tokens_seen += self.global_batch * cfg.seq_len
        return self.dist.all_sum([loss_sum.item() / cfg.grad_accum])[0] / self.dist.world_size

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean loss and perplexity over ``eval_batches`` batches of held-out rows spread over the set."""
        cfg = self.cfg
        wanted = cfg.eval_batches * cfg.batch_size * self.dist.world_size
        if self.val_data.num_rows == 0 or wanted == 0:
            return None
        rows = np.unique(
            np.linspace(0, self.val_data.num_rows - 1, min(wanted, self.val_data.num_rows)).astype(int)
        )
        mine = rows[self.dist.rank :: self.dist.world_size]
        # Llama has no dropout, so train mode computes the same thing; it keeps Linear on its autograd path.
        total = 0.0
        for start in range(0, len(mine), cfg.batch_size):
            batch = self.val_data.rows(mine[start : start + cfg.batch_size]).to(self.device)
            with self._autocast():
                total += NextTokenLoss(self.model)(batch[:, :-1], batch[:, 1:]).item() * len(batch)
        total, count = self.dist.all_sum([total, float(len(mine))])
        loss = total / count
        return {"step": self.step, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def run(self) -> dict:
        cfg = self.cfg
        self._say(self._describe())
        if cfg.eval_every > 0 and self.step == 0:
            self._record_eval()
        start = time.perf_counter()
        session_tokens = 0
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        with bar:
            last_step = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
            while self.step < last_step:
                lr = self.scheduler.get_last_lr()[0]
                step_start = time.perf_counter()
                loss = self.train_step()
                step_seconds = time.perf_counter() - step_start
                self.train_seconds += step_seconds
                self.history["seconds"].append(step_seconds)
                session_tokens += self.global_batch * cfg.seq_len
                self.history["loss"].append(loss)
                self.history["lr"].append(lr)
                elapsed = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{session_tokens / elapsed:,.0f}")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}; lower --lr")
                if cfg.eval_every > 0 and self.step % cfg.eval_every == 0:
                    self._record_eval()
                if cfg.save_every > 0 and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                if self._out_of_time(elapsed):
                    self._say(
                        f"stopping at step {self.step}: --max-time-minutes {cfg.max_time_minutes} reached"
                    )
                    break
        final_eval = self._record_eval()
        session_seconds = time.perf_counter() - start
        self.save_checkpoint()
        summary = self._summary(final_eval, session_seconds, session_tokens)
        if self.dist.is_main:
            export_hf(self.model, self.hf_config, self.data_dir, cfg.out, cfg.save_dtype)
            (cfg.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            (cfg.out / "train_summary.md").write_text(summary_markdown(summary))
            self._say(f"wrote the model to {cfg.out}; results in {cfg.out / 'train_summary.md'}")
        self.dist.barrier()
        return summary

    def _out_of_time(self, elapsed: float) -> bool:
        if self.cfg.max_time_minutes is None:
            return False
        # Rank 0's clock decides, so every process stops after the same step.
        over = float(self.dist.is_main and elapsed > self.cfg.max_time_minutes * 60)
        return self.dist.all_sum([over])[0] > 0

    def _record_eval(self) -> dict | None:
        evals = self.history["eval"]
        if evals and evals[-1]["step"] == self.step:
            return evals[-1]
        result = self.evaluate()
        if result is not None:
            self.history["eval"].append(result)
            self._say(
                f"step {result['step']}: held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"
            )
        return result

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message, file=sys.stderr)

    def _describe(self) -> str:
        c = self.corpus
        return (
            f"{count_parameters(self.model):,} parameters; {c.train_documents} training files "
            f"({c.train_tokens:,} tokens, {self.train_data.num_rows:,} rows of {self.cfg.seq_len}), "
            f"{c.val_documents} held out ({c.val_tokens:,} tokens); global batch {self.global_batch} rows "
            f"= {self.global_batch * self.cfg.seq_len:,} tokens; {self.dist.world_size} process(es) on "
            f"{self.device.type}"
        )

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "model": self.model.state_dict(),
            "objective": {k: v for k, v in self.objective.state_dict().items() if not k.startswith("model.")},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "position": self.position,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "history": self.history,
            "hf_config": self.hf_config,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def _read_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.is_file():
            self._say(f"--resume: no checkpoint in {self.state_dir}, starting from scratch")
            return None
        return torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state.get("objective", {}), strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.position = state["step"], state["position"]
        self.tokens_seen, self.train_seconds = state["tokens_seen"], state["train_seconds"]
        self.history = state["history"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        random.setstate(state["rng"]["python"])
        self._say(f"resumed from {self.checkpoint_path} at step {self.step}")

    # ---------------------------------------------------------------- summary

    def _summary(self, final_eval: dict | None, session_seconds: float, session_tokens: int) -> dict:
        losses = self.history["loss"]
        # The median step excludes compilation, evaluation and checkpointing: the speed to plan runs with.
        median_step = float(np.median(self.history["seconds"])) if self.history["seconds"] else 0.0
        return {
            "steps": self.step,
            "train_loss": losses[-1] if losses else None,
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "val_loss": final_eval["loss"] if final_eval else None,
            "val_perplexity": final_eval["perplexity"] if final_eval else None,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "wall_seconds": session_seconds,
            "tokens_per_second": session_tokens / session_seconds if session_seconds > 0 else None,
            "steady_tokens_per_second": self.global_batch * self.cfg.seq_len / median_step
            if median_step
            else None,
            "parameters": count_parameters(self.model),
            "global_batch_rows": self.global_batch,
            "hardware": hardware_description(self.device, self.dist.world_size),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()},
            "model_config": self.hf_config,
            "data": {k: v for k, v in asdict(self.corpus).items() if k != "val_names"},
            "held_out_files": self.corpus.val_names,
            "separator": SEPARATOR,
            "step_losses": losses,
            "step_lrs": self.history["lr"],
            "evals": self.history["eval"],
        }
