"""CUDA graphs for the decode step: capture once per batch-size bucket, replay every step.

Paper: none; NVIDIA's CUDA graphs as vLLM and gpt-fast use them for decoding (gpt-fast through
``torch.compile(mode="reduce-overhead")``). Idea: a decode step of a small model is hundreds of
small kernels whose launch and Python dispatch cost more than their GPU time (effinfer bf16
streamed 165 GB/s of an H200's 4.8 TB/s at batch 1, docs/results/gpu_decode_h200.md). A graph
records the whole step (model and output projection) once, on static input buffers; each later
step copies its token ids, positions, cache slots, block tables and context lengths into those
buffers and replays the graph with one launch. A batch is padded up to its bucket (1, 2, 4, …, 64,
capped by ``max_num_seqs``): padding rows write no cache slot (slot -1) and read no context
(length 0), and their logits are dropped. The block table buffer is as wide as the longest
sequence allows, so one graph serves every context length.

Only pure decode steps replay (one query per sequence, every row sampled, one cache group, every
attention layer on the Triton kernels of ``kernels/triton/``, which read lengths from tensors and
skip slot -1); prefill, speculative verification and batches above the largest bucket run
eagerly. A capture that fails (an operation that cannot be captured) logs a warning and turns
graphs off for the engine: decoding goes on eagerly.

Switch: on by default on CUDA; ``EFFINFER_CUDA_GRAPHS=0`` turns it off (as does
``EFFINFER_TRITON_OPS=0``, since graphs replay the Triton decode path).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from effinfer.layers.attention import AttentionMetadata, PagedAttention

logger = logging.getLogger(__name__)

SWITCH = "EFFINFER_CUDA_GRAPHS"
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes to capture: the standard buckets below ``max_num_seqs``, and ``max_num_seqs``
    itself when it is no larger than the last bucket."""
    buckets = [b for b in BUCKETS if b < max_num_seqs]
    if max_num_seqs <= BUCKETS[-1]:
        buckets.append(max_num_seqs)
    return tuple(buckets)


def bucket_for(num_seqs: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``num_seqs`` rows; None when none does (eager)."""
    return next((b for b in buckets if b >= num_seqs), None)


def why_not_graphs(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype, num_cache_groups: int, has_state: bool
) -> str | None:
    """Why decode steps of ``model`` cannot replay CUDA graphs here, or None when they can."""
    if device.type != "cuda":
        return "not on CUDA"
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if dist.is_available() and dist.is_initialized():
        return "tensor / pipeline parallel runs decode eagerly"
    if has_state:
        return "recurrent layers keep per-sequence state outside the KV cache"
    if num_cache_groups != 1:
        return f"{num_cache_groups} cache groups (sliding-window layers)"
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    with torch.inference_mode():
        probe = torch.empty(0, device=device, dtype=dtype)
        if not layers or not all(layer.runs_triton(probe) for layer in layers):
            return (
                "an attention layer is not on the Triton kernels (int8 KV cache, attention sinks, no Triton)"
            )
    return None


class DecodeGraphs:
    """Captured decode steps of one model, keyed by bucket, with the static buffers they read."""

    def __init__(self, model: torch.nn.Module, device: torch.device, buckets: tuple[int, ...],
                 max_blocks_per_seq: int, block_size: int) -> None:  # fmt: skip
        self.model = model
        self.device = device
        self.buckets = buckets
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.failed = False
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._buffers: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        *,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        num_cache_groups: int,
        has_state: bool,
    ) -> DecodeGraphs | None:
        """Graphs for this model's decode steps, or None (logged) where they cannot run."""
        reason = why_not_graphs(model, device, dtype, num_cache_groups, has_state)
        if reason is not None:
            if device.type == "cuda":
                logger.info("CUDA graphs off: %s; decode runs eagerly", reason)
            return None
        buckets = graph_buckets(max_num_seqs)
        logger.info("CUDA graphs for decode at batch sizes %s (captured on first use)", list(buckets))
        return cls(model, device, buckets, -(-max_model_len // block_size), block_size)

    @property
    def captured_sizes(self) -> list[int]:
        """The buckets captured so far (empty after a failed capture)."""
        return sorted(self._graphs)

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta,
        sample_rows: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Float32 logits [rows, vocab] of a decode step by graph replay; None: run it eagerly."""
        if self.failed or not isinstance(meta, AttentionMetadata) or meta.is_prefill:
            return None
        num_seqs = input_ids.shape[0]
        bucket = bucket_for(num_seqs, self.buckets)
        if (
            bucket is None
            or sample_rows is None
            or sample_rows.numel() != num_seqs
            or meta.context_lens_tensor is None
            or (meta.group_slot_mappings is not None and len(meta.group_slot_mappings) != 1)
            or meta.block_tables.shape[1] > self.max_blocks_per_seq
        ):
            return None
        self._fill(input_ids, positions, meta, bucket)
        if bucket not in self._graphs and not self._capture(bucket):
            return None
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:num_seqs].clone()

    def _fill(self, input_ids, positions, meta: AttentionMetadata, bucket: int) -> None:
        """Copy the step into the static buffers; rows past it up to the bucket become padding."""
        if self._buffers is None:
            rows, device = self.buckets[-1], self.device
            self._buffers = dict(
                input_ids=torch.zeros(rows, dtype=torch.long, device=device),
                positions=torch.zeros(rows, dtype=torch.long, device=device),
                slot_mapping=torch.full((rows,), -1, dtype=torch.long, device=device),
                context_lens=torch.zeros(rows, dtype=torch.long, device=device),
                block_tables=torch.zeros(rows, self.max_blocks_per_seq, dtype=torch.long, device=device),
            )
        b, n = self._buffers, input_ids.shape[0]
        b["input_ids"][:n].copy_(input_ids)
        b["positions"][:n].copy_(positions)
        b["slot_mapping"][:n].copy_(meta.slot_mapping)
        b["context_lens"][:n].copy_(meta.context_lens_tensor)
        b["block_tables"][:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if n < bucket:  # padding: no cache write, no context read; stale table rows are never read
            b["slot_mapping"][n:bucket].fill_(-1)
            b["context_lens"][n:bucket].zero_()

    def _step(self, bucket: int) -> torch.Tensor:
        b = self._buffers
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=b["slot_mapping"][:bucket],
            block_tables=b["block_tables"][:bucket],
            context_lens=[self.max_blocks_per_seq * self.block_size] * bucket,  # unread: lengths are tensors
            query_lens=[1] * bucket,
            block_size=self.block_size,
            context_lens_tensor=b["context_lens"][:bucket],
        )
        hidden = self.model(b["input_ids"][:bucket], b["positions"][:bucket], meta)
        return self.model.compute_logits(hidden).float()

    def _capture(self, bucket: int) -> bool:
        """Record the step for ``bucket`` (its buffers hold the current step, which the warm-up runs:
        writing the same keys to the same slots twice changes nothing). False: graphs are off now."""
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # compiles the Triton kernels, lets cuBLAS pick its algorithms
                self._step(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(bucket)
            self._pool = graph.pool()
            self._graphs[bucket] = (graph, logits)
            logger.info("captured the decode step for batch size %d", bucket)
            return True
        except Exception as error:  # an op that cannot be captured: decode eagerly from now on
            self.failed = True
            self._graphs.clear()
            logger.warning(
                "CUDA graph capture failed at batch size %d (%s: %s); decoding eagerly from now on (%s=0 skips capture)",
                bucket, type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", SWITCH,
            )  # fmt: skip
            return False
