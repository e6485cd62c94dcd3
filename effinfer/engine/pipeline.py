"""Pipeline parallelism: the decoder layers run in stages, one stage per process group of ranks.

GPipe (Huang et al. 2019) cuts the layers into contiguous stages and a batch into micro-batches,
so that while stage s works on micro-batch i, stage s + 1 works on micro-batch i - 1. Here the
driver (rank 0) cuts each scheduled batch into as many micro-batches as there are stages (whole
sequences, about equal token counts) and prepares their inputs, which the executor
(``engine/executor.py``) broadcasts to every rank; the first stage embeds each micro-batch and
sends its hidden states on, every later stage receives them, runs its layers and sends them on,
and the last stage turns the rows to sample into float32 logits and sends those to the driver,
which collects them after issuing every micro-batch. Only one step is in flight (the next needs
this one's tokens), so with M equal stages and M micro-batches each stage idles about
(M - 1) / (2M - 1) of a step (GPipe's bubble). Each stage holds its own layers' weights and KV
cache (``models/stage.py``); all stages keep the same number of KV blocks, so the driver's block
tables are valid everywhere. Tensors move with ``torch.distributed`` point-to-point sends (gloo on
CPU, NCCL on CUDA). Switch it on with ``--pipeline-parallel-size M`` (``LLM(...,
pipeline_parallel_size=M)``); it combines with ``--tensor-parallel-size`` (each stage TP-sharded).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from effinfer.config import ConfigError
from effinfer.engine.cache_groups import KVCacheLayout
from effinfer.engine.runner import ModelRunner, cache_layout
from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import Sequence
from effinfer.models.stage import PipelineStage

# Bytes this process moved point to point: "hidden_sent" (to the next stage), "logits_sent" (the
# last stage to the driver), "logits_received" (the driver from the last stage).
_moved_bytes: Counter = Counter()


def pipeline_bytes() -> dict[str, int]:
    """Bytes this process sent to or received from other stages since the last reset, by kind."""
    return dict(_moved_bytes)


def reset_pipeline_bytes() -> None:
    _moved_bytes.clear()


@dataclass(frozen=True)
class PipelineTopology:
    """Where this rank sits: global rank = stage * tp_size + tp_rank (tensor parallelism innermost).

    Each tensor-parallel rank of a stage holds the whole hidden state after its row-parallel
    all-reduce and sends it to the same tensor-parallel rank of the next stage.
    """

    stage: PipelineStage
    tp_size: int = 1
    tp_rank: int = 0
    driver_rank: int = 0
    # The process group of the stage-to-stage sends (ranks are global). A stage may wait on the one
    # before it for a whole forward pass, a first one that compiles kernels included, so the
    # executor passes a group without a timeout (a dead peer still ends the wait with an error).
    group: Any = None

    def rank_of(self, stage_index: int) -> int:
        return stage_index * self.tp_size + self.tp_rank

    @property
    def is_driver(self) -> bool:
        return self.rank_of(self.stage.index) == self.driver_rank

    @property
    def sends_logits(self) -> bool:
        """The last stage's first tensor-parallel rank returns the logits (unless it is the driver)."""
        return self.stage.is_last and self.tp_rank == 0 and not self.is_driver


def split_micro_batches(batch: list[ScheduledSeq], num_micro_batches: int) -> list[list[ScheduledSeq]]:
    """Cut the batch into at most ``num_micro_batches`` runs of consecutive sequences with about
    equal token counts (a sequence's tokens stay in one micro-batch: its attention needs them together)."""
    total = sum(entry.num_query_tokens for entry in batch)
    parts: list[list[ScheduledSeq]] = [[]]
    done = 0
    for remaining, entry in zip(range(len(batch) - 1, -1, -1), batch):
        parts[-1].append(entry)
        done += entry.num_query_tokens
        closes = done * num_micro_batches >= total * len(parts)
        if closes and remaining and len(parts) < num_micro_batches:
            parts.append([])
    return parts


class PipelineRunner(ModelRunner):
    """A ``ModelRunner`` for one stage's model (``keep_stage``). The driver calls ``run`` / ``run_chunk``,
    which prepare the micro-batches and hand them to ``execute``; the executor (``engine/executor.py``)
    gives every other rank the same micro-batches for its own ``execute``, and agrees the block count.
    ``execute`` returns the logits on the driver and None on every other rank.
    """

    def __init__(self, model: torch.nn.Module, *args, topology: PipelineTopology, **kwargs) -> None:
        self.topology = topology
        # The driver's block tables have one table per cache group of the whole model.
        if cache_layout(model).group_specs != KVCacheLayout.from_specs(model.cache_specs()).group_specs:
            raise ConfigError(
                "pipeline parallelism needs every stage to hold layers of every cache group; this model "
                "mixes sliding-window and full-attention layers in a way the stages would split"
            )
        super().__init__(model, *args, **kwargs)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor | None:
        """Float32 logits [rows, vocab] of the rows to sample, in batch order, on the driver (see ``prepare``)."""
        micro_batches = split_micro_batches(batch, self.topology.stage.num_stages)
        return self.execute([self.prepare(part) for part in micro_batches])

    @torch.inference_mode()
    def run_chunk(self, seq: Sequence, start: int, stop: int) -> torch.Tensor | None:
        """``ModelRunner.run_chunk`` through the stages: logits of every row, on the driver."""
        return self.execute([self.prepare_chunk(seq, start, stop)])

    @torch.inference_mode()
    def execute(self, micro_batches: list[tuple]) -> torch.Tensor | None:
        """Each prepared (token ids, positions, metadata, rows to sample or None for all) through this stage."""
        topo, stage = self.topology, self.topology.stage
        hidden_size, vocab = self.config.hidden_size, self.config.vocab_size
        pending, logits = [], []
        for input_ids, positions, meta, rows in micro_batches:
            if stage.is_first:
                hidden = self.model(input_ids, positions, meta)
            else:
                hidden = torch.empty(len(input_ids), hidden_size, dtype=self.dtype, device=self.device)
                dist.recv(hidden, src=topo.rank_of(stage.index - 1), group=topo.group)
                hidden = self.model(input_ids, positions, meta, hidden_states=hidden)
            if not stage.is_last:
                pending.append(_send(hidden, topo.rank_of(stage.index + 1), topo.group, "hidden_sent"))
                continue
            if rows is not None and rows.numel() != hidden.shape[0]:
                hidden = hidden.index_select(0, rows)
            rows_logits = self.model.compute_logits(hidden).float()
            if topo.is_driver:
                logits.append(rows_logits)
            elif topo.sends_logits and rows_logits.numel():
                pending.append(_send(rows_logits, topo.driver_rank, topo.group, "logits_sent"))
        if topo.is_driver and not stage.is_last:  # collected after every micro-batch is on its way
            last = topo.rank_of(stage.num_stages - 1)
            for input_ids, _, _, rows in micro_batches:
                num_rows = len(input_ids) if rows is None else rows.numel()
                logits.append(torch.empty(num_rows, vocab, device=self.device))
                if num_rows:
                    dist.recv(logits[-1], src=last, group=topo.group)
                    _moved_bytes["logits_received"] += logits[-1].numel() * logits[-1].element_size()
        for work, _ in pending:
            work.wait()
        return torch.cat(logits) if topo.is_driver else None


def _send(tensor: torch.Tensor, dst: int, group: Any, kind: str) -> tuple:
    """An asynchronous send, and the tensor it must keep alive until it completes."""
    tensor = tensor.contiguous()
    _moved_bytes[kind] += tensor.numel() * tensor.element_size()
    return dist.isend(tensor, dst=dst, group=group), tensor
