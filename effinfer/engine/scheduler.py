"""Continuous batching (Orca, Yu et al. 2022) with preemption by recomputation (vLLM).

Every step the scheduler decides afresh which sequences run: waiting ones are admitted for
prefill while there are free slots, blocks and token budget; otherwise every running sequence
decodes one token. When the cache runs out of blocks, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(often cheaply, from the prefix cache) once memory frees up.
"""

from __future__ import annotations

from collections import deque

from effinfer.engine.kv_cache import BlockManager
from effinfer.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns the sequences to run this step and whether it is a prefill step."""
        scheduled: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if scheduled and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            num_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        if scheduled:
            return scheduled, True

        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        self.running.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in aborted:
            if seq in self.running:
                self.block_manager.free(seq)
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
        return aborted
