"""Model runner: owns the model and the KV cache tensors, turns a scheduled batch of sequences
into flat input tensors (token ids, positions, cache slots, block tables), runs the model and
returns the logits of the rows to sample: each sequence's last token, plus one row per draft
token under speculative decoding. The cache follows the model's per-layer specs
(``model.cache_specs()``, grouped by ``engine/cache_groups.py``): slot mappings and block tables
are built per cache group, and each attention layer is bound to its group's tables and tensor.
"""

from __future__ import annotations

import logging

import torch

from effinfer.config import ConfigError, EngineConfig, ModelConfig, available_memory_bytes
from effinfer.engine.cache_groups import KVCacheLayout
from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import PLACEHOLDER_BLOCK, Sequence
from effinfer.layers.attention import AttentionMetadata, PagedAttention

logger = logging.getLogger(__name__)

# One scale per (token slot, KV head) of an int8 cache.
KV_SCALE_DTYPE = torch.float32


def kv_bytes_per_block(
    config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
    layers_per_block: int | None = None,
) -> int:
    """Bytes of one block's keys and values (int8: codes plus a float32 scale per head).

    A block holds ``layers_per_block`` layers (``KVCacheLayout.layers_per_block``; all layers when
    every layer has the same cache spec).
    """
    if kv_cache_dtype == "int8":
        per_head = config.head_dim * 1 + KV_SCALE_DTYPE.itemsize
    else:
        per_head = config.head_dim * dtype.itemsize
    layers = config.num_layers if layers_per_block is None else layers_per_block
    return 2 * layers * block_size * config.num_kv_heads * per_head


def attention_layers(model: torch.nn.Module) -> list[PagedAttention]:
    """The model's attention layers in decoder-layer order."""
    return [m for m in model.modules() if isinstance(m, PagedAttention)]


def cache_layout(model: torch.nn.Module) -> KVCacheLayout:
    """Cache groups from the model's per-layer specs; refuses layers the shared tensors cannot hold."""
    layers = attention_layers(model)
    specs = model.cache_specs()
    if len(specs) != len(layers):
        raise ConfigError(f"the model lists {len(specs)} cache specs for {len(layers)} attention layers")
    shapes = {(layer.num_kv_heads, layer.head_dim) for layer in layers}
    if len(shapes) > 1:
        raise ConfigError(f"attention layers with different KV shapes {sorted(shapes)} are not supported")
    return KVCacheLayout.from_specs(specs)


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
        self.layout = cache_layout(model)
        self.num_blocks = num_blocks or self._num_blocks(engine_config, max_model_len)
        self._allocate_kv_cache()

    @property
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(
            self.config, self.block_size, self.dtype, self.kv_cache_dtype, self.layout.layers_per_block
        )

    def _num_blocks(self, engine_config: EngineConfig, max_model_len: int) -> int:
        per_block = self.kv_bytes_per_block
        if engine_config.kv_cache_memory is not None:
            budget = engine_config.kv_cache_memory
        else:
            budget = int(available_memory_bytes(self.device) * engine_config.kv_cache_memory_fraction)
            # No point reserving more than every sequence at full length could use in every group.
            blocks_per_seq = -(-max_model_len // self.block_size) * self.layout.num_groups
            budget = min(budget, per_block * blocks_per_seq * engine_config.max_num_seqs)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ConfigError(
                f"KV-cache budget of {budget} bytes is smaller than one block of {self.block_size} tokens "
                f"({per_block} bytes); raise kv_cache_memory (--kv-cache-memory) or kv_cache_memory_fraction"
            )
        return num_blocks

    def _allocate_kv_cache(self) -> None:
        """``layers_per_block`` K and V tensors; the j-th layer of every cache group uses tensor j."""
        layers = attention_layers(self.model)
        shape = (self.num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        int8 = self.kv_cache_dtype == "int8"
        cache_dtype = torch.int8 if int8 else self.dtype
        tensors = []
        for _ in range(self.layout.layers_per_block):
            k = torch.zeros(shape, dtype=cache_dtype, device=self.device)
            v = torch.zeros(shape, dtype=cache_dtype, device=self.device)
            scales = (
                (torch.zeros(shape[:3], dtype=KV_SCALE_DTYPE, device=self.device),
                 torch.zeros(shape[:3], dtype=KV_SCALE_DTYPE, device=self.device))
                if int8 else (None, None)
            )  # fmt: skip
            tensors.append((k, v, *scales))
        for index, (group, tensor) in self.layout.placement().items():
            layers[index].bind_cache(group, *tensors[tensor])
        logger.info(
            "KV cache: %d blocks of %d tokens, %d cache groups, %s (%.1f MiB)",
            self.num_blocks, self.block_size, self.layout.num_groups,
            "int8" if int8 else str(self.dtype).removeprefix("torch."),
            self.num_blocks * self.kv_bytes_per_block / 2**20,
        )  # fmt: skip

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Per cache group: [num_seqs, max_blocks], placeholders and padding as block 0 (masked)."""
        width = max(len(table) for s in seqs for table in s.block_tables)
        return [
            self._tensor(
                [
                    [0 if b == PLACEHOLDER_BLOCK else b for b in s.block_tables[g]]
                    + [0] * (width - len(s.block_tables[g]))
                    for s in seqs
                ]
            )
            for g in range(self.layout.num_groups)
        ]

    def _slot(self, seq: Sequence, position: int, group: int = 0) -> int:
        block = seq.block_tables[group][position // self.block_size]
        return block * self.block_size + position % self.block_size

    def _slots(self, seq: Sequence, start: int, stop: int) -> list[list[int]]:
        """Per cache group, the cache slots of positions ``start:stop``."""
        slots = [[self._slot(seq, p, g) for p in range(start, stop)] for g in range(len(seq.block_tables))]
        assert all(s >= 0 for group in slots for s in group), "KV written to a block given back"
        return slots

    def _metadata(self, slots: list[list[int]], tables: list[torch.Tensor], **fields) -> AttentionMetadata:
        slot_tensors = [self._tensor(group) for group in slots]
        return AttentionMetadata(
            slot_mapping=slot_tensors[0],
            block_tables=tables[0],
            block_size=self.block_size,
            group_slot_mappings=slot_tensors,
            group_block_tables=tables,
            **fields,
        )

    def prepare(self, batch: list[ScheduledSeq]):
        """Flat inputs of a step: token ids, positions, attention metadata and the rows to sample.

        Each entry contributes its new tokens (and draft tokens, if any); an entry that reaches its
        sequence's end contributes 1 + len(drafts) rows to sample, the last ones of its queries.
        """
        input_ids, positions, query_lens, context_lens, sample_rows = [], [], [], [], []
        slots: list[list[int]] = [[] for _ in range(self.layout.num_groups)]
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
            for group, group_slots in zip(slots, self._slots(seq, start, stop)):
                group.extend(group_slots)
            query_lens.append(len(tokens))
            context_lens.append(stop)
        meta = self._metadata(
            slots,
            self._block_tables([entry.seq for entry in batch]),
            is_prefill=any(n != 1 for n in query_lens),
            context_lens=context_lens,
            query_lens=query_lens,
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
        meta = self._metadata(
            self._slots(seq, start, stop),
            self._block_tables([seq]),
            is_prefill=True,
            context_lens=[stop],
            query_lens=[stop - start],
        )
        hidden = self.model(self._tensor(seq.token_ids[start:stop]), self._tensor(positions), meta)
        return self.model.compute_logits(hidden).float()
