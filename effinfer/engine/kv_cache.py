"""Paged KV cache bookkeeping (PagedAttention, Kwon et al. 2023) with prefix caching and
sliding-window freeing.

The cache is cut into fixed-size blocks; each sequence owns one block table per cache group
(``engine/cache_groups.py``: layers with the same spec), mapping its token positions to blocks,
so memory is allocated as the sequence grows and never fragments. All groups draw from one pool.
Sliding-window groups (Mistral, Gemma 3's local layers; Longformer, Beltagy et al. 2020) give a
block back as soon as every position in it has left the window of every later query, keeping the
first ``sink_tokens`` positions (StreamingLLM); the table keeps a placeholder there, which
attention masks. A sequence's sliding-window KV is thus bounded by the window, not its length.
Prefix caching: a full block is named by its group and a hash of its tokens and of every token
before it; a new sequence whose prompt starts the same way reuses those blocks (ref-counted)
instead of recomputing them. A sliding group only needs the blocks inside the window of the first
uncached position, so a prefix counts as cached when every group holds what it needs of it.
Freed blocks keep their contents and name until they are needed again (also blocks freed for
the window), and the least recently freed is reused first (LRU eviction). Switch off prefix
caching with ``enable_prefix_caching=False``; window freeing follows ``model.cache_specs()``.
A model with recurrent layers (Mamba) also needs a state slot per sequence (``StatePool``), taken
with its blocks and given back with them. Its prefix cache stays off: a cached block holds KV, but
the recurrent state after a prefix exists only for the sequence that computed it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from effinfer.engine.sequence import PLACEHOLDER_BLOCK, Sequence
from effinfer.engine.state_pool import StatePool
from effinfer.layers.cache_spec import AttentionCacheSpec

logger = logging.getLogger(__name__)

BlockName = tuple[int, int]  # (cache group, hash of the token chain up to and including the block)


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "group")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: BlockName | None = None
        self.token_ids: tuple[int, ...] = ()
        self.group = 0  # the cache group that last took it


def block_hash(prefix_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prefix_hash, token_ids))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        group_specs: list[AttentionCacheSpec] | None = None,
        num_state_slots: int = 0,
    ) -> None:
        """``group_specs``: one spec per cache group (default: one full-attention group; none for a
        model without attention). ``num_state_slots``: recurrent-state slots, for models with recurrent layers."""
        self.block_size = block_size
        self.state_pool = StatePool(num_state_slots) if num_state_slots else None
        if enable_prefix_caching and self.state_pool is not None:
            logger.info("prefix caching is off: a recurrent state cannot be reused from cached blocks")
            enable_prefix_caching = False
        self.enable_prefix_caching = enable_prefix_caching
        self.group_specs = [AttentionCacheSpec()] if group_specs is None else list(group_specs)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in the order they were freed: the front is the least recently used.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[BlockName, int] = {}
        self.blocks_in_use_per_group = [0] * len(self.group_specs)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_groups(self) -> int:
        return len(self.group_specs)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def num_state_slots(self) -> int:
        return self.state_pool.num_slots if self.state_pool else 0

    @property
    def num_free_state_slots(self) -> int:
        return self.state_pool.num_free_slots if self.state_pool else 0

    # ---- which blocks a group needs ------------------------------------------------------------
    def _sink_blocks(self, group: int) -> int:
        return -(-self.group_specs[group].sink_tokens // self.block_size)

    def _first_kept_block(self, group: int, next_position: int) -> int:
        """Blocks of ``group`` below this one (past its sinks) hold no key that a query at
        ``next_position`` or later can see."""
        return self.group_specs[group].first_needed_position(next_position) // self.block_size

    def _window_start(self, group: int, next_position: int) -> int:
        return max(self._sink_blocks(group), self._first_kept_block(group, next_position))

    def _num_held(self, group: int, num_blocks: int, next_position: int) -> int:
        """Blocks of a ``num_blocks`` table that ``group`` holds for queries from ``next_position`` on."""
        dropped = max(
            0, min(num_blocks, self._first_kept_block(group, next_position)) - self._sink_blocks(group)
        )
        return num_blocks - dropped

    # ---- taking and giving back blocks ---------------------------------------------------------
    def _take_free_block(self, block_id: int, group: int) -> Block:
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        block.group = group
        self.blocks_in_use_per_group[group] += 1
        return block

    def _allocate_fresh(self, group: int) -> int:
        block = self._take_free_block(next(iter(self.free_block_ids)), group)
        # Reusing a free block evicts whatever prefix it cached.
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash = None
        block.token_ids = ()
        block.ref_count = 1
        return block.block_id

    def _share(self, block_id: int, group: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._take_free_block(block_id, group)
        block.ref_count += 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, "block freed twice"
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None
            self.blocks_in_use_per_group[block.group] -= 1

    # ---- prefix cache --------------------------------------------------------------------------
    def _chain_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """The hash chain of the sequence's first full blocks, from its tokens (never from blocks,
        which a sliding window may have given back)."""
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if i else None, tuple(seq.block_tokens(i))))
        return hashes

    def _lookup(self, group: int, chain_hash: int, token_ids: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block_id.get((group, chain_hash))
        if block_id is not None and self.blocks[block_id].token_ids == token_ids:
            return block_id
        return None

    def _cached_prefix(self, seq: Sequence) -> tuple[int, list[dict[int, int]]]:
        """The most leading full blocks every group can take from the cache, and per group the
        cached block ids it would take (by block index)."""
        # At least one token must be computed so the step has logits to sample from.
        limit = (len(seq) - 1) // self.block_size
        hashes = self._chain_hashes(seq, limit)
        tokens = [tuple(seq.block_tokens(i)) for i in range(limit)]
        found: list[dict[int, int]] = [{} for _ in self.group_specs]
        for g, spec in enumerate(self.group_specs):
            for i in range(limit):
                block_id = self._lookup(g, hashes[i], tokens[i])
                if block_id is not None:
                    found[g][i] = block_id
                elif spec.is_full:
                    limit = i  # a full group needs every block of the prefix
                    break
        for num_blocks in range(limit, 0, -1):
            if all(self._holds_prefix(g, found[g], num_blocks) for g in range(self.num_groups)):
                return num_blocks, found
        return 0, found

    def _holds_prefix(self, group: int, found: dict[int, int], num_blocks: int) -> bool:
        """Whether ``found`` has every block of a ``num_blocks`` prefix that ``group`` needs."""
        start = self._window_start(group, num_blocks * self.block_size)
        sinks = range(min(self._sink_blocks(group), num_blocks))
        return all(i in found for i in sinks) and all(i in found for i in range(start, num_blocks))

    def _needs(self, group: int, index: int, next_position: int) -> bool:
        return index < self._sink_blocks(group) or index >= self._first_kept_block(group, next_position)

    # ---- sequences -----------------------------------------------------------------------------
    def _tokens_to_cover(self, seq: Sequence, num_cached_tokens: int, max_new_tokens: int | None) -> int:
        num_new = len(seq) - num_cached_tokens
        return num_cached_tokens + (num_new if max_new_tokens is None else min(num_new, max_new_tokens))

    def can_allocate(self, seq: Sequence, max_new_tokens: int | None = None) -> bool:
        """Whether the free blocks cover ``seq``'s cached prefix and up to ``max_new_tokens`` more
        (all its tokens by default), counting cached blocks too, as if nothing were shared, and a
        recurrent-state slot if the model has recurrent layers."""
        if self.state_pool is not None and not self.state_pool.num_free_slots:
            return False
        num_cached = self._cached_prefix(seq)[0] * self.block_size if self.enable_prefix_caching else 0
        num_blocks = -(-self._tokens_to_cover(seq, num_cached, max_new_tokens) // self.block_size)
        needed = sum(self._num_held(g, num_blocks, num_cached) for g in range(self.num_groups))
        return self.num_free_blocks >= needed

    def allocate(
        self,
        seq: Sequence,
        max_new_tokens: int | None = None,
        use_prefix_cache: bool = True,
        publish: bool = True,
    ) -> None:
        """Give a waiting sequence blocks for its tokens, reusing cached prefix blocks.

        Sets ``num_computed_tokens`` to the tokens found in the prefix cache; covers at most
        ``max_new_tokens`` more (a first prefill chunk; later ones ``grow``), all by default.
        ``publish`` names the full blocks among those in the cache at once, for a caller that
        computes them now; a chunked prefill passes False and calls ``publish`` per chunk.
        ``use_prefix_cache=False`` neither reuses nor publishes blocks: for a sequence whose KV is
        written a chunk at a time outside the step loop, and may be left incomplete.
        """
        assert not seq.block_tables
        caching = self.enable_prefix_caching and use_prefix_cache
        num_cached_blocks, found = self._cached_prefix(seq) if caching else (0, [])
        if caching:
            self.prefix_cache_queries += (len(seq) - 1) // self.block_size
            self.prefix_cache_hits += num_cached_blocks
        num_cached = num_cached_blocks * self.block_size
        num_blocks = -(-self._tokens_to_cover(seq, num_cached, max_new_tokens) // self.block_size)
        seq.block_tables = [[] for _ in self.group_specs]
        seq.window_starts = [self._window_start(g, num_cached) for g in range(self.num_groups)]
        for g, table in enumerate(seq.block_tables):
            for i in range(num_blocks):
                if i >= num_cached_blocks:
                    table.append(self._allocate_fresh(g))
                elif self._needs(g, i, num_cached):
                    table.append(self._share(found[g][i], g))
                else:
                    table.append(PLACEHOLDER_BLOCK)
        seq.num_cached_tokens = seq.num_computed_tokens = num_cached
        if self.state_pool is not None:
            seq.state_slot = self.state_pool.take()
        # Without caching, pretend every block is named already so publish() names none.
        seq.num_hashed_blocks = num_cached_blocks if caching else 1 << 62
        if publish:
            self.publish(seq, num_blocks * self.block_size)

    def publish(self, seq: Sequence, num_tokens: int) -> None:
        """Name the full blocks among the first ``num_tokens`` tokens, whose KV this step writes.

        Within a step every layer stores the whole batch's keys before any sequence attends, so a
        sequence admitted later in the same step may already reuse what this one writes.
        """
        stop = min(num_tokens, len(seq)) // self.block_size
        if seq.num_hashed_blocks >= stop:
            return
        hashes = self._chain_hashes(seq, stop)
        for i in range(seq.num_hashed_blocks, stop):
            token_ids = tuple(seq.block_tokens(i))
            for g, table in enumerate(seq.block_tables):
                if table[i] != PLACEHOLDER_BLOCK:
                    self._register(self.blocks[table[i]], (g, hashes[i]), token_ids)
        seq.num_hashed_blocks = stop

    def _register(self, block: Block, name: BlockName, token_ids: tuple[int, ...]) -> None:
        block.hash = name
        block.token_ids = token_ids
        self.hash_to_block_id.setdefault(name, block.block_id)

    def free_outside_window(self, seq: Sequence, next_position: int | None = None) -> None:
        """Give back the sliding-window blocks no query at ``next_position`` or later can see
        (default: the sequence's first uncomputed token, where its next step's queries start)."""
        if not seq.block_tables:
            return
        position = seq.num_computed_tokens if next_position is None else next_position
        for g, spec in enumerate(self.group_specs):
            if spec.is_full:
                continue
            table = seq.block_tables[g]
            stop = min(self._first_kept_block(g, position), len(table))
            for i in range(seq.window_starts[g], stop):
                self._release(table[i])
                table[i] = PLACEHOLDER_BLOCK
            seq.window_starts[g] = max(seq.window_starts[g], stop)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the LRU order evicts a sequence's tail before its shared prefix.
        for table in seq.block_tables:
            for block_id in reversed(table):
                if block_id != PLACEHOLDER_BLOCK:
                    self._release(block_id)
        seq.block_tables = []
        seq.window_starts = []
        if seq.state_slot is not None:
            self.state_pool.give_back(seq.state_slot)
            seq.state_slot = None
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        # num_cached_tokens stays: the request's last output reports it; allocate() sets it afresh.

    def max_blocks_held(self, num_tokens: int, tokens_per_step: int) -> int:
        """The most blocks a sequence of ``num_tokens`` holds at once over all groups when its KV is
        computed ``tokens_per_step`` tokens at a time and its window blocks are given back after each."""
        total = -(-num_tokens // self.block_size)
        held = 0
        for g, spec in enumerate(self.group_specs):
            if spec.is_full:
                held += total
            else:  # the window before a step's first query, that step's tokens, a partial block each side
                span = -(-(spec.sliding_window - 1 + tokens_per_step) // self.block_size) + 1
                held += min(total, self._sink_blocks(g) + span)
        return held

    def can_grow(self, seq: Sequence, num_slots: int) -> bool:
        """Whether every group's block table can cover cache slots for ``num_slots`` token positions."""
        have = len(seq.block_tables[0]) if seq.block_tables else 0
        needed = max(-(-num_slots // self.block_size) - have, 0) * self.num_groups
        return self.num_free_blocks >= needed

    def grow(self, seq: Sequence, num_slots: int) -> None:
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.group_specs]
            seq.window_starts = [self._sink_blocks(g) for g in range(self.num_groups)]
        for g, table in enumerate(seq.block_tables):
            while len(table) * self.block_size < num_slots:
                table.append(self._allocate_fresh(g))
