"""Model runner: owns the model and the KV cache tensors, turns a scheduled batch of sequences
into flat input tensors (token ids, positions, cache slots, block tables), runs the model and
returns the logits of the rows to sample: each sequence's last token, plus one row per draft
token under speculative decoding. On CUDA, decode steps replay CUDA graphs (``cuda_graphs.py``). The cache follows the model's per-layer specs
(``model.cache_specs()``, grouped by ``engine/cache_groups.py``): slot mappings and block tables
are built per cache group, and each attention layer is bound to its group's tables and tensor.
Recurrent layers (Mamba) are bound to their share of a state pool instead: one slot per running
sequence, told per step which slot each sequence has and which start from zero. One memory budget
pays for the state slots first (one per sequence the batch may hold) and KV blocks from the rest.
"""

from __future__ import annotations

import logging

import torch

from effinfer.config import ConfigError, EngineConfig, ModelConfig, available_memory_bytes
from effinfer.engine.cache_groups import KVCacheLayout
from effinfer.engine.cuda_graphs import DecodeGraphs
from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import PLACEHOLDER_BLOCK, Sequence
from effinfer.layers.attention import AttentionMetadata, PagedAttention
from effinfer.layers.cache_spec import SSM_STATE_DTYPE, AttentionCacheSpec, RecurrentMetadata
from effinfer.layers.mamba import MambaMixer
from effinfer.models.base import DecodePlan
from effinfer.models.stage import stage_cache_specs

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


def recurrent_layers(model: torch.nn.Module) -> list[MambaMixer]:
    """The model's recurrent (state-space) layers in decoder-layer order."""
    return [m for m in model.modules() if isinstance(m, MambaMixer)]


def cache_layout(model: torch.nn.Module) -> KVCacheLayout:
    """Cache groups and state specs from the model's per-layer specs; refuses layers the shared tensors cannot hold."""
    layers, recurrent = attention_layers(model), recurrent_layers(model)
    specs = stage_cache_specs(model)  # a pipeline stage caches its own layers only
    num_attention = sum(isinstance(spec, AttentionCacheSpec) for spec in specs)
    if num_attention != len(layers) or len(specs) - num_attention != len(recurrent):
        raise ConfigError(
            f"the model lists {len(specs)} cache specs for {len(layers)} attention and "
            f"{len(recurrent)} recurrent layers"
        )
    layout = KVCacheLayout.from_specs(specs)
    if list(layout.state_specs) != [layer.state_spec() for layer in recurrent]:
        raise ConfigError("the model's recurrent state specs do not match its recurrent layers")
    shapes = {(layer.num_kv_heads, layer.head_dim) for layer in layers}
    if len(shapes) > 1:
        raise ConfigError(f"attention layers with different KV shapes {sorted(shapes)} are not supported")
    return layout


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
        """``num_blocks``: the KV blocks to hold; by default as many as the engine's memory budget
        allows after the recurrent-state slots (one per sequence, for models with recurrent layers)."""
        self.model = model
        self.config = model_config
        self.block_size = engine_config.block_size
        self.device = device
        self.dtype = dtype
        self.kv_cache_dtype = engine_config.kv_cache_dtype
        self.layout = cache_layout(model)
        budget = self._cache_budget(engine_config, max_model_len)
        self.num_state_slots = self._num_state_slots(budget, engine_config.max_num_seqs)
        budget -= self.num_state_slots * self.state_bytes_per_slot
        self.num_blocks = (num_blocks or self._num_blocks(budget)) if self.layout.groups else 0
        if self.layout.groups:
            self._allocate_kv_cache()
        if self.num_state_slots:
            self._allocate_state_pool()
        # Decode steps as a flat list of kernel calls, asked of the model at the first decode step
        # (CausalLM.decode_plan; on CPU, models/cpu_decode_plan.py); None: the modules run.
        self.decode_plan: DecodePlan | None = None
        self._plan_made = False
        # Decode steps replayed as CUDA graphs (engine/cuda_graphs.py); None: always eager.
        self.decode_graphs = DecodeGraphs.for_model(
            model, device, dtype, block_size=self.block_size, max_model_len=max_model_len,
            max_num_seqs=engine_config.max_num_seqs, num_cache_groups=self.layout.num_groups,
            has_state=bool(self.layout.state_specs),
        )  # fmt: skip

    @property
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(
            self.config, self.block_size, self.dtype, self.kv_cache_dtype, self.layout.layers_per_block
        )

    @property
    def state_bytes_per_slot(self) -> int:
        """Bytes of one sequence's recurrent state over all recurrent layers (0 without any)."""
        return sum(spec.bytes_per_sequence(self.dtype) for spec in self.layout.state_specs)

    def _cache_budget(self, engine_config: EngineConfig, max_model_len: int) -> int:
        if engine_config.kv_cache_memory is not None:
            return engine_config.kv_cache_memory
        budget = int(available_memory_bytes(self.device) * engine_config.kv_cache_memory_fraction)
        # No point reserving more than every sequence at full length could use in every group.
        blocks_per_seq = -(-max_model_len // self.block_size) * self.layout.num_groups
        per_seq = self.kv_bytes_per_block * blocks_per_seq + self.state_bytes_per_slot
        return min(budget, per_seq * engine_config.max_num_seqs)

    def _num_state_slots(self, budget: int, max_num_seqs: int) -> int:
        per_slot = self.state_bytes_per_slot
        if not per_slot:
            return 0
        if budget < per_slot:
            raise ConfigError(
                f"cache budget of {budget} bytes is smaller than one sequence's recurrent state ({per_slot} "
                "bytes); raise kv_cache_memory (--kv-cache-memory) or kv_cache_memory_fraction"
            )
        return min(max_num_seqs, budget // per_slot)

    def _num_blocks(self, budget: int) -> int:
        per_block = self.kv_bytes_per_block
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

    def _allocate_state_pool(self) -> None:
        """Per recurrent layer, a conv and an SSM state for each slot (a slot serves one sequence)."""
        slots = self.num_state_slots
        for layer, spec in zip(recurrent_layers(self.model), self.layout.state_specs):
            conv = torch.zeros(slots, *spec.conv_state_shape, dtype=self.dtype, device=self.device)
            ssm = torch.zeros(slots, *spec.ssm_state_shape, dtype=SSM_STATE_DTYPE, device=self.device)
            layer.bind_state(conv, ssm)
        logger.info(
            "recurrent state pool: %d slots of %.1f KiB (%.1f MiB)",
            slots, self.state_bytes_per_slot / 2**10, slots * self.state_bytes_per_slot / 2**20,
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

    def _recurrent_metadata(
        self,
        seqs: list[Sequence],
        starts: list[int],
        query_lens: list[int],
        attention: AttentionMetadata | None,
    ) -> RecurrentMetadata:
        """Each sequence's state slot; those starting at their first token begin from a zero state."""
        slots = [seq.state_slot for seq in seqs]
        if None in slots:
            raise ConfigError(
                "a sequence of a model with recurrent layers holds no state slot: such a model can only run "
                "under its own engine's block manager (not as a draft model)"
            )
        fresh = [slot for slot, start in zip(slots, starts) if start == 0]
        return RecurrentMetadata(query_lens, self._tensor(slots), self._tensor(fresh), attention)

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
        seqs = [entry.seq for entry in batch]
        meta = None
        if self.layout.groups:
            meta = self._metadata(
                slots,
                self._block_tables(seqs),
                is_prefill=any(n != 1 for n in query_lens),
                context_lens=context_lens,
                query_lens=query_lens,
                context_lens_tensor=self._tensor(context_lens),
            )
        if self.layout.state_specs:
            starts = [stop - q_len for stop, q_len in zip(context_lens, query_lens)]
            meta = self._recurrent_metadata(seqs, starts, query_lens, meta)
        return self._tensor(input_ids), self._tensor(positions), meta, self._tensor(sample_rows)

    def prepare_prefill(self, seqs: list[Sequence]):
        """``prepare`` for whole prompts after their cached prefix; the last index is each prompt's last token."""
        return self.prepare([ScheduledSeq(seq, seq.num_uncomputed_tokens) for seq in seqs])

    def shutdown(self) -> None:
        """Release worker processes; a single-process runner has none."""

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Float32 logits [rows, vocab] of the rows to sample, in batch order (see ``prepare``)."""
        return self.execute(self.prepare(batch))

    @torch.inference_mode()
    def execute(self, inputs: tuple) -> torch.Tensor:
        """The model on prepared inputs (a parallel runner's workers get these from the driver)."""
        input_ids, positions, meta, sample_rows = inputs
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(input_ids, positions, meta, sample_rows)
            if logits is not None:
                return logits
        hidden = None
        if isinstance(meta, AttentionMetadata) and not meta.is_prefill:
            if not self._plan_made:
                make_plan = getattr(self.model, "decode_plan", None)  # CausalLM's; None for other modules
                self.decode_plan = make_plan(self.device, self.dtype) if make_plan is not None else None
                self._plan_made = True
            if self.decode_plan is not None:
                hidden = self.decode_plan.run(input_ids, positions, meta)
        if hidden is None:
            hidden = self.model(input_ids, positions, meta)
        if sample_rows is not None and sample_rows.numel() != hidden.shape[0]:
            hidden = hidden.index_select(0, sample_rows)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def run_chunk(self, seq: Sequence, start: int, stop: int) -> torch.Tensor:
        """Logits [stop - start, vocab] in float32 of tokens ``start:stop`` of ``seq``, whose KV before
        ``start`` is already in the cache (a prefill chunk: each row attends to all tokens up to it)."""
        return self.execute(self.prepare_chunk(seq, start, stop))

    def prepare_chunk(self, seq: Sequence, start: int, stop: int):
        """``prepare`` for tokens ``start:stop`` of one sequence, every row's logits kept."""
        positions = list(range(start, stop))
        meta = None
        if self.layout.groups:
            meta = self._metadata(
                self._slots(seq, start, stop),
                self._block_tables([seq]),
                is_prefill=True,
                context_lens=[stop],
                query_lens=[stop - start],
            )
        if self.layout.state_specs:
            meta = self._recurrent_metadata([seq], [start], [stop - start], meta)
        return self._tensor(seq.token_ids[start:stop]), self._tensor(positions), meta, None
