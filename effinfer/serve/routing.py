"""Which data-parallel replica takes a request: the least loaded one, unless another holds its prefix.

Each replica keeps its own prefix cache (``engine/kv_cache.py``), so a prompt that starts like one
sent before is cheaper on the replica that served it: its first blocks' KV is already there. The
router remembers, for the chained hashes of a prompt's first full blocks, the replica it last sent
them to, and sends a prompt to the owner of its longest remembered prefix unless that replica
carries more than ``affinity_slack`` sequences beyond the least loaded one. Otherwise, and for
prompts without a full block, the least loaded replica wins (ties: the one routed to least often).
Load is the router's own count of a replica's open sequences (running + waiting), exact at once,
unlike the replica's stats snapshot, which arrives a step later.
"""

from __future__ import annotations

from collections import OrderedDict

# A prefix longer than this many blocks adds little to the choice and costs hashing per request.
MAX_AFFINITY_BLOCKS = 32
# Prefix hashes remembered (oldest forgotten first): 64k entries are a few MiB.
MAX_REMEMBERED_PREFIXES = 1 << 16


class NoReplicaError(RuntimeError):
    """Every replica has stopped."""


class Router:
    def __init__(self, num_replicas: int, block_size: int, affinity_slack: int) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        self.block_size = block_size
        self.affinity_slack = affinity_slack
        self.num_routed = [0] * num_replicas
        self._owner: OrderedDict[int, int] = OrderedDict()  # prefix hash -> replica it went to last

    def prefix_hashes(self, token_ids: list[int]) -> list[int]:
        """Chained hashes of the first full blocks: entry i stands for the tokens of blocks 0..i."""
        num_blocks = min(len(token_ids) // self.block_size, MAX_AFFINITY_BLOCKS)
        hashes, previous = [], 0
        for start in range(0, num_blocks * self.block_size, self.block_size):
            previous = hash((previous, tuple(token_ids[start : start + self.block_size])))
            hashes.append(previous)
        return hashes

    def choose(self, token_ids: list[int] | None, loads: list[int | None]) -> int:
        """The replica for a prompt; ``loads[k]`` is replica k's open sequences, None if it stopped."""
        alive = [k for k, load in enumerate(loads) if load is not None]
        if not alive:
            raise NoReplicaError("every data-parallel replica has stopped")
        least = min(alive, key=lambda k: (loads[k], self.num_routed[k], k))
        hashes = self.prefix_hashes(token_ids) if token_ids else []
        choice = least
        for prefix in reversed(hashes):  # the longest remembered prefix decides
            owner = self._owner.get(prefix)
            if owner is None or loads[owner] is None:
                continue
            if loads[owner] - loads[least] <= self.affinity_slack:
                choice = owner
            break
        for prefix in hashes:
            self._owner[prefix] = choice
            self._owner.move_to_end(prefix)
        while len(self._owner) > MAX_REMEMBERED_PREFIXES:
            self._owner.popitem(last=False)
        self.num_routed[choice] += 1
        return choice
