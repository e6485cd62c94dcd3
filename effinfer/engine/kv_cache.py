"""Paged KV cache bookkeeping (PagedAttention, Kwon et al. 2023) with prefix caching.

The cache is cut into fixed-size blocks; each sequence owns a block table mapping its token
positions to blocks, so memory is allocated as the sequence grows and never fragments.
Prefix caching: a full block is named by a hash of its tokens and of every token before it;
a new sequence whose prompt starts the same way reuses those blocks (ref-counted) instead of
recomputing them. Freed blocks keep their contents and hash until they are needed again, and
the least recently freed is reused first (LRU eviction). Switch off with
``enable_prefix_caching=False``.
"""

from __future__ import annotations

from collections import OrderedDict

from effinfer.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(prefix_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prefix_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in the order they were freed: the front is the least recently used.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _take_free_block(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free_block_ids.popitem(last=False)
        else:
            del self.free_block_ids[block_id]
        return self.blocks[block_id]

    def _allocate_fresh(self) -> Block:
        block = self._take_free_block()
        # Reusing a free block evicts whatever prefix it cached.
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash = None
        block.token_ids = ()
        block.ref_count = 1
        return block

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= seq.num_blocks

    def allocate(self, seq: Sequence, use_prefix_cache: bool = True, publish: bool = True) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Sets ``num_computed_tokens`` to the tokens found in the prefix cache. ``publish`` names the
        full blocks in the cache at once, for a caller that computes the whole prompt now; a chunked
        prefill passes False and calls ``publish`` as each chunk is scheduled.
        ``use_prefix_cache=False`` neither reuses nor publishes blocks: for a sequence whose KV is
        written a chunk at a time outside the step loop, and may be left incomplete.
        """
        assert not seq.block_table
        caching = self.enable_prefix_caching and use_prefix_cache
        prefix_hash = None
        cache_missed = not caching
        seq.num_cached_tokens = 0
        for i in range(seq.num_blocks):
            token_ids = tuple(seq.block_tokens(i))
            # At least one token must be computed so the step has logits to sample from.
            reusable = len(token_ids) == self.block_size and (i + 1) * self.block_size < len(seq)
            block = None
            if not cache_missed and reusable:
                self.prefix_cache_queries += 1
                prefix_hash = block_hash(prefix_hash, token_ids)
                cached_id = self.hash_to_block_id.get(prefix_hash)
                if cached_id is not None and self.blocks[cached_id].token_ids == token_ids:
                    block = self.blocks[cached_id]
                    if block.ref_count == 0:
                        self._take_free_block(cached_id)
                    block.ref_count += 1
                    seq.num_cached_tokens += self.block_size
                    self.prefix_cache_hits += 1
            if block is None:
                cache_missed = True
                block = self._allocate_fresh()
            seq.block_table.append(block.block_id)
        seq.num_computed_tokens = seq.num_cached_tokens
        # Without caching, pretend every block is named already so publish() names none.
        seq.num_hashed_blocks = seq.num_cached_tokens // self.block_size if caching else 1 << 62
        if publish:
            self.publish(seq, len(seq))

    def publish(self, seq: Sequence, num_tokens: int) -> None:
        """Name the full blocks among the first ``num_tokens`` tokens, whose KV this step writes.

        Within a step every layer stores the whole batch's keys before any sequence attends, so a
        sequence admitted later in the same step may already reuse what this one writes.
        """
        for i in range(seq.num_hashed_blocks, min(num_tokens, len(seq)) // self.block_size):
            prefix_hash = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            if i > 0 and prefix_hash is None:
                break
            token_ids = tuple(seq.block_tokens(i))
            self._register(self.blocks[seq.block_table[i]], block_hash(prefix_hash, token_ids), token_ids)
            seq.num_hashed_blocks = i + 1

    def _register(self, block: Block, h: int, token_ids: tuple[int, ...]) -> None:
        block.hash = h
        block.token_ids = token_ids
        self.hash_to_block_id.setdefault(h, block.block_id)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the LRU order evicts a sequence's tail before its shared prefix.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, "block freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        # num_cached_tokens stays: the request's last output reports it; allocate() sets it afresh.

    def can_grow(self, seq: Sequence, num_slots: int) -> bool:
        """Whether the block table can cover cache slots for ``num_slots`` token positions."""
        needed = -(-num_slots // self.block_size) - len(seq.block_table)
        return self.num_free_blocks >= max(needed, 0)

    def grow(self, seq: Sequence, num_slots: int) -> None:
        while len(seq.block_table) * self.block_size < num_slots:
            seq.block_table.append(self._allocate_fresh().block_id)
