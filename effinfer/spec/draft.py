"""Draft-model proposer: a smaller model with the target's vocabulary guesses the next k tokens.

Paper: Leviathan et al. 2023 / Chen et al. 2023. Idea: run the cheap model k times, greedily,
to propose k tokens; the target checks them all in one step. The draft keeps its own paged KV
cache, one shadow sequence per target sequence; after a verification, the draft's cached tokens
that disagree with what the target kept are recomputed on the next proposal, and a preempted or
finished sequence gives its draft blocks back.
Switch on: ``LLM(target, speculative_model=DRAFT_PATH, num_speculative_tokens=4)``; any model
effinfer loads (HF directory or GGUF, quantized or not) whose vocabulary is the target's.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from effinfer.config import ConfigError
from effinfer.engine.kv_cache import BlockManager
from effinfer.engine.runner import ModelRunner, cache_layout
from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import Sequence
from effinfer.loading.checkpoint import open_checkpoint

if TYPE_CHECKING:
    from effinfer.engine.engine import LLMEngine

# Token ids whose text both tokenizers must agree on (spread over the vocabulary).
NUM_VOCAB_PROBES = 256


class DraftModelProposer:
    def __init__(self, engine: LLMEngine, path: str | os.PathLike) -> None:
        config = engine.config
        checkpoint = open_checkpoint(path)
        check_same_vocabulary(engine, checkpoint.model_config.vocab_size, checkpoint.tokenizer, path)
        dtype = config.resolve_dtype(checkpoint.model_config)
        self.max_model_len = min(engine.max_model_len, checkpoint.model_config.max_position_embeddings)
        model = checkpoint.load_model(dtype, engine.device, self.max_model_len, config.show_progress)
        # The draft never holds more tokens than the target, so it gets the target's block count
        # (per cache group) rather than a second share of the free memory.
        target_groups = engine.runner.layout.num_groups
        num_blocks = -(-engine.num_kv_blocks * cache_layout(model).num_groups // target_groups)
        self.runner = ModelRunner(
            model, checkpoint.model_config, config, engine.device, dtype, self.max_model_len,
            num_blocks=num_blocks,
        )  # fmt: skip
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, False, self.runner.layout.group_specs
        )
        self.block_size = config.block_size
        self._shadows: dict[int, Sequence] = {}  # target seq_id -> the draft's copy of it

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        active = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            k = min(k, self.max_model_len - len(seq))
            shadow = self._sync(seq) if k > 0 else None
            # Slots for the catch-up tokens and all drafts but the last, whose KV is never needed.
            if shadow is not None and self.block_manager.can_grow(shadow, len(seq) + k - 1):
                self.block_manager.grow(shadow, len(seq) + k - 1)
                active.append((i, shadow, k))
        while active:
            batch = [ScheduledSeq(shadow, shadow.num_uncomputed_tokens) for _, shadow, _ in active]
            next_tokens = self.runner.run(batch).argmax(dim=-1).tolist()
            for (i, shadow, _), token in zip(active, next_tokens):
                shadow.num_computed_tokens = len(shadow)
                shadow.token_ids.append(token)
                drafts[i].append(token)
            active = [(i, shadow, k) for i, shadow, k in active if len(drafts[i]) < k]
        return drafts

    def _sync(self, seq: Sequence) -> Sequence:
        """The draft's copy of ``seq`` with the target's tokens; its KV is kept where they agree."""
        shadow = self._shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.request_id, seq.index, seq.token_ids, seq.params, self.block_size, 1)
            self._shadows[seq.seq_id] = shadow
            return shadow
        agree = 0
        limit = min(len(shadow), len(seq), shadow.num_computed_tokens)
        old, new = shadow.token_ids, seq.token_ids
        while agree < limit and old[agree] == new[agree]:
            agree += 1
        shadow.token_ids = list(new)
        shadow.num_computed_tokens = min(agree, len(seq) - 1)
        # Only now is it known how far back the cached tokens agree: window KV before that can go.
        self.block_manager.free_outside_window(shadow)
        return shadow

    def forget(self, seq: Sequence) -> None:
        shadow = self._shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)


def check_same_vocabulary(engine: LLMEngine, vocab_size: int, tokenizer, path) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    target_vocab = engine.model_config.vocab_size
    if vocab_size != target_vocab:
        raise ConfigError(
            f"draft model {str(path)!r} has a vocabulary of {vocab_size} tokens but the target has "
            f"{target_vocab}: speculative decoding needs the same tokenizer"
        )
    size = min(tokenizer.vocab_size, engine.tokenizer.vocab_size)
    for token_id in torch.linspace(0, size - 1, NUM_VOCAB_PROBES).long().unique().tolist():
        ours = tokenizer.decode([token_id], skip_special_tokens=False)
        theirs = engine.tokenizer.decode([token_id], skip_special_tokens=False)
        if ours != theirs:
            raise ConfigError(
                f"draft model {str(path)!r} has another vocabulary than the target: token {token_id} is "
                f"{ours!r} there and {theirs!r} in the target"
            )
