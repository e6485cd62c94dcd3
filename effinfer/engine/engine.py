"""The step loop: schedule -> run the model -> sample -> append -> process outputs -> finish.

``LLMEngine`` is synchronous and single-threaded: callers add requests, call ``step()`` until
nothing is left, and read back ``RequestOutput`` updates. The offline ``LLM`` API and the HTTP
server both drive it. Opening the checkpoint is ``loading/checkpoint.py``'s job; turning tokens
into text, stop strings and deltas is ``output_processor.py``'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator

import torch

from effinfer.config import ConfigError, EngineConfig
from effinfer.engine.executor import start_runner
from effinfer.engine.kv_cache import BlockManager
from effinfer.engine.output_processor import OutputProcessor
from effinfer.engine.scheduler import ScheduledSeq, Scheduler
from effinfer.engine.sequence import Sequence
from effinfer.engine.speculation import AcceptedTokens, Speculator, build_speculator
from effinfer.engine.stats import EngineStats
from effinfer.layers.sampler import Sampler, SamplingRow
from effinfer.loading.checkpoint import open_checkpoint
from effinfer.outputs import RequestOutput
from effinfer.sampling_params import SamplingParams

__all__ = ["EngineStats", "LLMEngine", "PromptError"]

logger = logging.getLogger(__name__)

# Token budget of a step with chunked prefill when max_num_batched_tokens is not given (vLLM's).
DEFAULT_CHUNKED_BATCHED_TOKENS = 2048


class PromptError(ValueError):
    """A prompt cannot be served: empty, or longer than the model's context."""


def physical_core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LLMEngine:
    def __init__(self, model: str | os.PathLike, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        checkpoint = open_checkpoint(model, config.quantization)
        checkpoint = dataclasses.replace(
            checkpoint, model_config=config.model_layout(checkpoint.model_config)
        )
        self.model_path = checkpoint.path
        self.model_config = checkpoint.model_config
        self.tokenizer = checkpoint.tokenizer
        self.device = torch.device(config.device)
        self.dtype = config.resolve_dtype(self.model_config)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or physical_core_count())
        max_model_len = config.context_length(self.model_config)
        # One process, or the driver of tensor-parallel ranks (engine/executor.py).
        self.runner = start_runner(checkpoint, config, self.dtype, max_model_len)
        layout = self.runner.layout
        if config.speculative_model and layout.has_recurrent_state:
            raise ConfigError(
                "speculative decoding is not supported for models with recurrent layers (Mamba): rejected "
                "draft tokens would have to be rolled back out of the recurrent state, which keeps no "
                "per-token history"
            )
        # A whole prompt needs its blocks in every cache group before a sliding window frees any.
        kv_capacity = self.runner.num_blocks // max(layout.num_groups, 1) * config.block_size
        if layout.groups and kv_capacity < max_model_len:
            logger.warning(
                "KV cache holds %d tokens; limiting the context from %d to that", kv_capacity, max_model_len
            )
            max_model_len = kv_capacity
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            layout.group_specs,
            self.runner.num_state_slots,
        )
        self.sampler = Sampler()
        eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids))
        self.output_processor = OutputProcessor(self.tokenizer, eos_token_ids, max_model_len)
        self.speculator: Speculator | None = build_speculator(self) if config.speculative_model else None
        lookahead = self.speculator.num_speculative_tokens if self.speculator else 0
        if config.enable_chunked_prefill:
            max_batched = config.max_num_batched_tokens or DEFAULT_CHUNKED_BATCHED_TOKENS
        else:
            max_batched = config.max_num_batched_tokens or max(4096, max_model_len)
        if max_batched < 1 + lookahead:
            raise ConfigError(
                f"max_num_batched_tokens ({max_batched}) must hold a decode token and its {lookahead} "
                "speculative tokens"
            )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, max_batched, config.enable_chunked_prefill, lookahead
        )
        self._request_counter = itertools.count()
        self._num_steps = 0
        self._num_draft_tokens = 0
        self._num_accepted_tokens = 0
        self._num_verify_steps = 0  # sequence-steps that verified at least one draft

    @property
    def model(self) -> torch.nn.Module:
        """The loaded model (weights on ``device``, KV-cache tensors attached to its attention layers)."""
        return self.runner.model

    def shutdown(self) -> None:
        """Stop the runner's worker processes (tensor parallelism); nothing to do in one process."""
        self.runner.shutdown()

    @property
    def num_kv_blocks(self) -> int:
        """KV-cache blocks the runner holds (a draft model's cache is sized to match)."""
        return self.runner.num_blocks

    @property
    def eos_token_ids(self) -> list[int]:
        return self.output_processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, token_ids: list[int]) -> None:
        self.output_processor.eos_token_ids = list(token_ids)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        if request_id is None:
            request_id = str(next(self._request_counter))
        if self.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise PromptError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if not prompt_ids:
            raise PromptError("prompt is empty: it must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptError(
                f"prompt is {len(prompt_ids)} tokens long, but the model's context is {self.max_model_len} "
                "tokens and at least one must be left for generation"
            )
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seqs = [
            Sequence(request_id, index, prompt_ids, params, self.config.block_size, max_tokens, self.device)
            for index in range(params.n)
        ]
        self.output_processor.add_request(prompt_text, seqs)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks and state slot; unknown or finished ids are ignored."""
        for seq in self.scheduler.abort(request_id):
            if self.speculator is not None:
                self.speculator.forget(seq)
        self.output_processor.remove_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_request(self, request_id: str) -> bool:
        """Whether the engine still holds ``request_id`` (added, and its final output not yet returned)."""
        return self.output_processor.has_request(request_id)

    def unfinished_request_ids(self) -> list[str]:
        """Every request the engine holds, in the order they were added."""
        return self.output_processor.request_ids()

    def running_request_ids(self) -> list[str]:
        """Requests with a sequence in the running batch: the ones the next step computes."""
        return list(dict.fromkeys(seq.request_id for seq in self.scheduler.running))

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        """How busy the engine is now: batch, queue, KV blocks, preemptions and prefix-cache reuse."""
        blocks = self.block_manager
        return EngineStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_requests=len(self.unfinished_request_ids()),
            num_blocks=blocks.num_blocks,
            num_free_blocks=blocks.num_free_blocks,
            blocks_in_use_per_group=tuple(blocks.blocks_in_use_per_group),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits,
            num_steps=self._num_steps,
            num_draft_tokens=self._num_draft_tokens,
            num_accepted_tokens=self._num_accepted_tokens,
            num_verify_steps=self._num_verify_steps,
        )

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if self.speculator is not None:
            for seq in self.scheduler.preempted:
                self.speculator.forget(seq)
        if not batch:
            return []
        if self.speculator is not None:
            self.speculator.propose(batch)
        logits = self.runner.run(batch)
        sampling = [entry for entry in batch if entry.samples]
        for entry in batch:
            entry.seq.num_computed_tokens += entry.num_new_tokens
        accepted = None
        if self.speculator is not None:
            accepted = self.speculator.accept(sampling, logits, self._sampling_row)
        if accepted is None:
            sampled = self.sampler(logits, [self._sampling_row(entry.seq) for entry in sampling])
            accepted = [AcceptedTokens([t], [lp], 0, 0) for t, lp in zip(sampled.token_ids, sampled.logprobs)]
        for entry, result in zip(sampling, accepted):
            self._append(entry, result)
        for entry in batch:  # the next queries start at num_computed_tokens: older window KV can go
            self.block_manager.free_outside_window(entry.seq)
        self._num_steps += 1
        return self.output_processor.request_outputs(list(dict.fromkeys(e.seq.request_id for e in sampling)))

    def _append(self, entry: ScheduledSeq, result: AcceptedTokens) -> None:
        """Append a sequence's new tokens one at a time, stopping where a stop condition ends it."""
        seq = entry.seq
        # The accepted drafts' KV was written by this step; the last token's is not yet.
        seq.num_computed_tokens += result.num_accepted_drafts
        seq.num_draft_tokens += result.num_draft_tokens
        seq.num_accepted_tokens += result.num_accepted_drafts
        seq.num_verify_steps += result.num_draft_tokens > 0
        self._num_draft_tokens += result.num_draft_tokens
        self._num_accepted_tokens += result.num_accepted_drafts
        self._num_verify_steps += result.num_draft_tokens > 0
        for token_id, token_logprobs in zip(result.token_ids, result.logprobs):
            seq.token_ids.append(token_id)
            self.output_processor.process_token(seq, token_logprobs)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                if self.speculator is not None:
                    self.speculator.forget(seq)
                break

    def _sampling_row(self, seq: Sequence, extra_token_ids: list[int] | None = None) -> SamplingRow:
        """How to sample ``seq``'s next token, or the one after ``extra_token_ids`` were appended."""
        extra = extra_token_ids or []
        under_min_tokens = seq.num_output_tokens + len(extra) < seq.params.min_tokens
        return SamplingRow(
            params=seq.params,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids + extra,
            generator=seq.generator,
            banned_token_ids=self.output_processor.banned_token_ids(seq) if under_min_tokens else None,
        )

    # ---- scoring ------------------------------------------------------------------------------
    def teacher_forced_logits(self, token_ids: list[int], chunk: int = 1) -> Iterator[torch.Tensor]:
        """Feed ``token_ids`` through the paged KV cache ``chunk`` tokens at a time, as serving does.

        Yields float32 logits [rows, vocab] per chunk; taken together, row i predicts token i + 1.
        The engine must be idle; the sequence's blocks are freed when the iteration ends.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("scoring through the KV cache needs an idle engine")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        seq = Sequence("score", 0, token_ids, SamplingParams(max_tokens=1), self.config.block_size, 1)
        blocks = self.block_manager
        if blocks.num_free_blocks < blocks.max_blocks_held(len(token_ids) - 1, chunk):
            raise RuntimeError(f"the KV cache cannot hold a {len(token_ids)}-token window")
        # Never published to the prefix cache: the last token's KV is not computed here. Blocks are
        # taken chunk by chunk, and sliding-window layers give theirs back as the chunks advance.
        blocks.allocate(seq, max_new_tokens=0, use_prefix_cache=False)
        try:
            for start in range(0, len(token_ids) - 1, chunk):
                stop = min(start + chunk, len(token_ids) - 1)
                if not blocks.can_grow(seq, stop):
                    raise RuntimeError(f"the KV cache cannot hold a {len(token_ids)}-token window")
                blocks.grow(seq, stop)
                yield self.runner.run_chunk(seq, start, stop)
                blocks.free_outside_window(seq, stop)
        finally:
            blocks.free(seq)
