"""The step loop: schedule -> run the model -> sample -> append -> detokenize -> finish.

``LLMEngine`` is synchronous and single-threaded: callers add requests, call ``step()`` until
nothing is left, and read back ``RequestOutput`` updates. The offline ``LLM`` API and the HTTP
server both drive it.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from effinfer.config import ConfigError, EngineConfig, ModelConfig
from effinfer.engine.kv_cache import BlockManager
from effinfer.engine.runner import ModelRunner
from effinfer.engine.scheduler import Scheduler
from effinfer.engine.sequence import Sequence
from effinfer.layers.sampler import Sampler, SamplingRow
from effinfer.loading.gguf import GGUFFile, is_gguf_file
from effinfer.loading.safetensors import check_model_dir, load_model
from effinfer.outputs import CompletionOutput, Logprob, RequestOutput
from effinfer.sampling_params import SamplingParams
from effinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class PromptError(ValueError):
    """A prompt cannot be served: empty, or longer than the model's context."""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    stop_holdback: int


def _load_quantized(path, scheme, model_config, dtype, device, max_model_len, show_progress):
    """Load float weights, quantize them (``EngineConfig.quantization``), then pack them for the kernels."""
    from effinfer.loading.builder import finalize_model
    from effinfer.loading.online_quant import quantize_on_load

    model = load_model(path, model_config, dtype, device, max_model_len, show_progress, finalize=False)
    with torch.no_grad():
        quantize_on_load(model, scheme, show_progress)
    return finalize_model(model, device, dtype)


def physical_core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LLMEngine:
    def __init__(self, model: str | os.PathLike, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if is_gguf_file(model):
            if config.quantization:
                raise ConfigError("a GGUF file is already quantized: leave quantization unset")
            checkpoint = GGUFFile(model)
            self.model_config = checkpoint.model_config()
            self.tokenizer = checkpoint.tokenizer()
            load_weights = checkpoint.load_model
        else:
            path = check_model_dir(model)
            self.model_config = ModelConfig.from_dir(path)
            self.tokenizer = Tokenizer.from_dir(path)
            load_weights = partial(load_model, path)
            if config.quantization:
                load_weights = partial(_load_quantized, path, config.quantization)
        self.model_path = Path(model)
        self.device = torch.device(config.device)
        self.dtype = config.resolve_dtype(self.model_config)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or physical_core_count())
        max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        model = load_weights(self.model_config, self.dtype, self.device, max_model_len, config.show_progress)
        self.runner = ModelRunner(model, self.model_config, config, self.device, self.dtype, max_model_len)
        kv_capacity = self.runner.num_blocks * config.block_size
        if kv_capacity < max_model_len:
            logger.warning(
                "KV cache holds %d tokens; limiting the context from %d to that", kv_capacity, max_model_len
            )
            max_model_len = kv_capacity
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        max_batched = config.max_num_batched_tokens or max(4096, max_model_len)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, max_batched)
        self.sampler = Sampler()
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids))
        self.requests: dict[str, _Request] = {}
        self._request_counter = itertools.count()
        self._last_output: dict[int, tuple[int, int]] = {}  # seq_id -> (text chars, tokens) already reported

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
        if request_id in self.requests:
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
        seqs = []
        for index in range(params.n):
            seq = Sequence(
                request_id, index, prompt_ids, params, self.config.block_size, max_tokens, self.device
            )
            seq.detokenizer = self.tokenizer.detokenizer(prompt_ids, params.skip_special_tokens)
            seqs.append(seq)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self.requests[request_id] = _Request(request_id, prompt_text, prompt_ids, params, seqs, holdback)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.seqs:
                self._last_output.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        logits = self.runner.run(seqs, is_prefill)
        rows = [
            SamplingRow(
                params=seq.params,
                prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids,
                generator=seq.generator,
                banned_token_ids=self._banned_tokens(seq),
            )
            for seq in seqs
        ]
        result = self.sampler(logits, rows)
        touched: dict[str, _Request] = {}
        for seq, token_id, logprobs in zip(seqs, result.token_ids, result.logprobs):
            self._append_token(seq, token_id, logprobs)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        return [self._request_output(r) for r in touched.values()]

    def _banned_tokens(self, seq: Sequence) -> list[int] | None:
        if seq.num_output_tokens >= seq.params.min_tokens:
            return None
        return self.eos_token_ids + seq.params.stop_token_ids

    def _append_token(self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None) -> None:
        params = seq.params
        seq.token_ids.append(token_id)
        if logprobs is not None:
            seq.logprobs.append(
                {
                    t: Logprob(lp, self.tokenizer.decode([t], skip_special_tokens=False))
                    for t, lp in logprobs.items()
                }
            )
        if not params.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif token_id in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id
        else:
            seq.text += seq.detokenizer.add(token_id)
            if params.stop and self._check_stop_strings(seq):
                return
            if seq.num_output_tokens >= seq.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            # A character whose bytes were cut off by the end of generation is shown as decode shows it.
            seq.text += seq.detokenizer.flush()

    def _check_stop_strings(self, seq: Sequence) -> bool:
        # Only the tail can hold a stop string that was not there before this token.
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, seq.stop_checked_upto - longest + 1)
        seq.stop_checked_upto = len(seq.text)
        hits = [(seq.text.find(s, search_from), s) for s in seq.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        seq.text = seq.text[: pos + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:pos]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _request_output(self, request: _Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            # While a stop string may still be forming at the end, hold those characters back.
            visible = seq.text if seq.is_finished else seq.text[: len(seq.text) - request.stop_holdback]
            text_sent, tokens_sent = self._last_output.get(seq.seq_id, (0, 0))
            output_ids = seq.output_token_ids
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=visible,
                    token_ids=output_ids,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=seq.logprobs if request.params.logprobs is not None else None,
                    delta_text=visible[text_sent:],
                    delta_token_ids=output_ids[tokens_sent:],
                )
            )
            self._last_output[seq.seq_id] = (max(text_sent, len(visible)), len(output_ids))
        finished = all(seq.is_finished for seq in request.seqs)
        if finished:
            del self.requests[request.request_id]
            for seq in request.seqs:
                self._last_output.pop(seq.seq_id, None)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=max(s.num_cached_tokens for s in request.seqs),
        )


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model is None:
        from effinfer.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"model path {str(model)!r} does not exist")
    return path
