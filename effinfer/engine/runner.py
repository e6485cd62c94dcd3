"""Model runner: owns the model and the KV cache tensors, turns a scheduled batch of sequences
into flat input tensors (token ids, positions, cache slots, block tables), runs the model and
returns the logits of the rows to sample: each sequence's last token, plus one row per draft
token under speculative decoding.
"""

from __future__ import annotations

import logging

import torch

from effinfer.config import ConfigError, EngineConfig, ModelConfig, available_memory_bytes
from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import Sequence
from effinfer.layers.attention import AttentionMetadata, PagedAttention

logger = logging.getLogger(__name__)

# One scale per (token slot, KV head) of an int8 cache.
KV_SCALE_DTYPE = torch.float32


def kv_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
) -> int:
    """Bytes of one block's keys and values over all layers (int8: codes plus a float32 scale per head)."""
    if kv_cache_dtype == "int8":
        per_head = config.head_dim * 1 + KV_SCALE_DTYPE.itemsize
    else:
        per_head = config.head_dim * dtype.itemsize
    return 2 * config.num_layers * block_size * config.num_kv_heads * per_head


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        num_blocks: int | None = None,
    ) -> None:
        """``num_blocks``: the KV blocks to hold; by default as many as the engine's memory budget allows."""
        self.model = model
        self.config = model_config
        self.block_size = engine_config.block_size
        self.device = device
        self.dtype = dtype
        self.kv_cache_dtype = engine_config.kv_cache_dtype
        self.num_blocks = num_blocks or self._num_blocks(engine_config, max_model_len)
        self._allocate_kv_cache()

    def _num_blocks(self, engine_config: EngineConfig, max_model_len: int) -> int:
        per_block = kv_bytes_per_block(self.config, self.block_size, self.dtype, self.kv_cache_dtype)
        if engine_config.kv_cache_memory is not None:
            budget = engine_config.kv_cache_memory
        else:
            budget = int(available_memory_bytes(self.device) * engine_config.kv_cache_memory_fraction)
            # No point reserving more than every sequence at full length could use.
            blocks_per_seq = -(-max_model_len // self.block_size)
            budget = min(budget, per_block * blocks_per_seq * engine_config.max_num_seqs)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ConfigError(
                f"KV-cache budget of {budget} bytes is smaller than one block of {self.block_size} tokens "
                f"({per_block} bytes); raise kv_cache_memory (--kv-cache-memory) or kv_cache_memory_fraction"
            )
        return num_blocks

    def _allocate_kv_cache(self) -> None:
        shape = (self.num_blocks, self.block_size, self.config.num_kv_heads, self.config.head_dim)
        attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        int8 = self.kv_cache_dtype == "int8"
        for layer in attention_layers:
            cache_dtype = torch.int8 if int8 else self.dtype
            layer.k_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
            if int8:
                layer.k_scale_cache = torch.zeros(shape[:3], dtype=KV_SCALE_DTYPE, device=self.device)
                layer.v_scale_cache = torch.zeros(shape[:3], dtype=KV_SCALE_DTYPE, device=self.device)
        size = self.num_blocks * kv_bytes_per_block(
            self.config, self.block_size, self.dtype, self.kv_cache_dtype
        )
        logger.info(
            "KV cache: %d blocks of %d tokens, %s (%.1f MiB)",
            self.num_blocks, self.block_size, "int8" if int8 else str(self.dtype).removeprefix("torch."),
            size / 2**20,
        )  # fmt: skip

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def prepare(self, batch: list[ScheduledSeq]):
        """Flat inputs of a step: token ids, positions, attention metadata and the rows to sample.

        Each entry contributes its new tokens (and draft tokens, if any); an entry that reaches its
        sequence's end contributes 1 + len(drafts) rows to sample, the last ones of its queries.
        """
        input_ids, positions, slots, query_lens, context_lens, sample_rows = [], [], [], [], [], []
        for entry in batch:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            tokens = seq.token_ids[start : start + entry.num_new_tokens] + entry.draft_token_ids
            stop = start + len(tokens)
            if entry.samples:
                sample_rows.extend(
                    range(len(input_ids) + entry.num_new_tokens - 1, len(input_ids) + len(tokens))
                )
            input_ids.extend(tokens)
            positions.extend(range(start, stop))
            slots.extend(self._slot(seq, p) for p in range(start, stop))
            query_lens.append(len(tokens))
            context_lens.append(stop)
        meta = AttentionMetadata(
            is_prefill=any(n != 1 for n in query_lens),
            slot_mapping=self._tensor(slots),
            block_tables=self._block_tables([entry.seq for entry in batch]),
            context_lens=context_lens,
            query_lens=query_lens,
            block_size=self.block_size,
            context_lens_tensor=self._tensor(context_lens),
        )
        return self._tensor(input_ids), self._tensor(positions), meta, self._tensor(sample_rows)

    def prepare_prefill(self, seqs: list[Sequence]):
        """``prepare`` for whole prompts after their cached prefix; the last index is each prompt's last token."""
        return self.prepare([ScheduledSeq(seq, seq.num_uncomputed_tokens) for seq in seqs])

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Float32 logits [rows, vocab] of the rows to sample, in batch order (see ``prepare``)."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta)
        if sample_rows.numel() != hidden.shape[0]:
            hidden = hidden.index_select(0, sample_rows)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def run_chunk(self, seq: Sequence, start: int, stop: int) -> torch.Tensor:
        """Logits [stop - start, vocab] in float32 of tokens ``start:stop`` of ``seq``, whose KV before
        ``start`` is already in the cache (a prefill chunk: each row attends to all tokens up to it)."""
        positions = list(range(start, stop))
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._tensor([self._slot(seq, p) for p in positions]),
            block_tables=self._block_tables([seq]),
            context_lens=[stop],
            query_lens=[stop - start],
            block_size=self.block_size,
        )
        hidden = self.model(self._tensor(seq.token_ids[start:stop]), self._tensor(positions), meta)
        return self.model.compute_logits(hidden).float()
