"""Continuous batching (Orca, Yu et al. 2022) with preemption by recomputation (vLLM), under a
token budget, with optional chunked prefill (Sarathi-Serve, Agrawal et al. 2024).

A step is a list of (sequence, number of new tokens): a prompt or a chunk of one, the one token
just sampled, or that token plus up to ``num_lookahead_tokens`` speculative ones to verify.
Every step the scheduler decides afresh which sequences run. Without chunking, waiting sequences
are admitted for a whole-prompt prefill step while there are free slots, blocks and token budget;
otherwise every running sequence decodes. With ``enable_chunked_prefill``, running sequences go
first and waiting prompts fill what is left of ``max_num_batched_tokens``, cut into chunks, so a
long prompt never stalls the streams already running. When the cache runs out of blocks, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the front of
the queue, to be recomputed (often cheaply, from the prefix cache) once memory frees up.
Block counts cover every cache group (``engine/cache_groups.py``); after a step, the engine gives
back the sliding-window blocks its sequences no longer need (``BlockManager.free_outside_window``).
A model with recurrent layers (Mamba) is admitted only while a state slot is free, which the block
manager checks with the blocks; a preempted sequence gives its slot back and recomputes its state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from effinfer.engine.kv_cache import BlockManager
from effinfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: the KV of tokens ``[num_computed, num_computed + num_new)``."""

    seq: Sequence
    num_new_tokens: int
    num_lookahead_slots: int = 0  # cache slots reserved for speculative tokens
    draft_token_ids: list[int] = field(default_factory=list)  # filled in by a proposer, at most the slots

    # Whether this step reaches the sequence's last token, so it yields a next token (set once, at
    # scheduling: the engine advances num_computed_tokens before it samples).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)

    @property
    def num_query_tokens(self) -> int:
        return self.num_new_tokens + len(self.draft_token_ids)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = False,
        num_lookahead_tokens: int = 0,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.num_lookahead_tokens = num_lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.preempted: list[Sequence] = []  # since the last schedule(): their side state must go too

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """The sequences to run this step and how many new tokens each gets."""
        self.preempted = []
        if self.enable_chunked_prefill:
            return self._schedule_chunked()
        admitted = self._admit_waiting(self.max_num_batched_tokens, chunk=False)
        return admitted or self._schedule_running(budget=None)

    def _schedule_chunked(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled = self._schedule_running(budget)
        budget -= sum(s.num_new_tokens + s.num_lookahead_slots for s in scheduled)
        return scheduled + self._admit_waiting(budget, chunk=True)

    def _admit_waiting(self, budget: int, chunk: bool) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not chunk and scheduled and len(seq) > budget:
                break
            # A chunked prompt takes blocks for its first chunk only; the next ones grow as they run.
            max_new = budget if chunk else None
            if not self.block_manager.can_allocate(seq, max_new):
                break
            self.block_manager.allocate(seq, max_new, publish=False)
            num_new = seq.num_uncomputed_tokens
            if chunk:
                num_new = min(num_new, budget)
            budget -= num_new
            self.block_manager.publish(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
        return scheduled

    def _schedule_running(self, budget: int | None) -> list[ScheduledSeq]:
        """Every running sequence that fits: the rest of a chunked prompt, or one decode token plus
        lookahead slots; ``budget=None`` means no token limit (decode-only steps)."""
        scheduled: list[ScheduledSeq] = []
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            if budget is not None and budget <= 0:
                kept.append(seq)
                continue
            num_new = seq.num_uncomputed_tokens
            if budget is not None:
                num_new = min(num_new, budget)
            lookahead = self.num_lookahead_tokens if seq.num_uncomputed_tokens == 1 else 0
            if budget is not None:
                lookahead = max(0, min(lookahead, budget - num_new))
            while True:
                slots = seq.num_computed_tokens + num_new + lookahead
                if self.block_manager.can_grow(seq, slots):
                    self.block_manager.grow(seq, slots)
                    self.block_manager.publish(seq, seq.num_computed_tokens + num_new)
                    scheduled.append(ScheduledSeq(seq, num_new, lookahead))
                    kept.append(seq)
                    if budget is not None:
                        budget -= num_new + lookahead
                    break
                if lookahead:
                    lookahead = 0  # speculation is the first thing to give up when memory is short
                elif self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
        self.running.extend(kept)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        """Send a running sequence back to the front of the queue, freeing its cache; it is recomputed
        when readmitted (what running out of blocks does; also for a caller that needs the room)."""
        self.running.remove(seq)
        self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        self.waiting.appendleft(seq)
        self.preempted.append(seq)

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
