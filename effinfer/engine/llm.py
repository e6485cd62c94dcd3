"""The offline Python API, shaped like vLLM's: ``LLM(model).generate(prompts, params)``.

Prompts go in as strings or token-id lists, all at once; the engine batches them continuously
and the results come back in prompt order. ``stream`` yields updates for one prompt as its
tokens arrive.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from effinfer.config import EngineConfig
from effinfer.engine.engine import LLMEngine
from effinfer.loading.checkpoint import resolve_model_path
from effinfer.outputs import RequestOutput
from effinfer.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, **engine_args) -> None:
        """``engine_args`` are ``EngineConfig``'s fields (dtype, device, max_num_seqs, ...), with its defaults."""
        config = EngineConfig(**engine_args)
        self.engine = LLMEngine(resolve_model_path(model), config)
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes now (they also stop when this process exits)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, sp))
        except Exception:
            # A bad prompt must not leave the good ones before it queued.
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[i] for i in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
                add_special_tokens=False,
            )
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yields the request's output after every step that changed it; the last one is finished."""
        request_id = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            if self.engine.has_request(request_id):
                self.engine.abort_request(request_id)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id list
    return prompts


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
    return params
