"""The transformers peer: the same model directory, dtype, device and threads, run with ``generate``.

Greedy, KV cache on, ``min_new_tokens = max_new_tokens`` so EOS never ends a row early. Batch-1
decode reads a timestamp after every generated token (a stopping criterion that never stops), so
prefill is excluded exactly as for effinfer. Offline throughput is ONE batched ``generate`` over
left-padded prompts: transformers cannot give each row its own length, so every row runs to the
longest requested output. Only each request's own output length counts as output tokens; the
tokens it computed in all (rows x longest) are reported separately as ``generated_tokens``.
"""

from __future__ import annotations

import gc
import time

import torch
import transformers
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from effinfer.bench.throughput import (
    DecodeResult,
    ThroughputResult,
    decode_result,
    parameter_count,
    synchronize,
    weight_read_bytes,
)
from effinfer.bench.workload import Workload


class HFRunner:
    name = "HF"

    def __init__(
        self,
        model_path: str,
        dtype: torch.dtype,
        device: torch.device,
        num_threads: int,
        show_progress: bool = True,
    ) -> None:
        torch.set_num_threads(num_threads)
        self.version = transformers.__version__
        self.device = torch.device(device)
        self.show_progress = show_progress
        hf_logging = transformers.utils.logging
        bars_were_on = hf_logging.is_progress_bar_enabled()
        if not show_progress:
            hf_logging.disable_progress_bar()
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()
        config = self.model.config
        self.pad_token_id = next(
            t for t in (config.pad_token_id, config.eos_token_id, 0) if isinstance(t, int)
        )
        self.weight_bytes = weight_read_bytes(self.model)
        self.num_parameters = parameter_count(self.model)

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, desc: str):
        """Runs generate for exactly ``new_tokens`` tokens per row; returns the time each token was ready."""
        with tqdm(total=new_tokens, desc=desc, unit="tok", disable=not self.show_progress) as bar:
            recorder = _TokenClock(self.device, bar)
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                use_cache=True,
                pad_token_id=self.pad_token_id,
                stopping_criteria=StoppingCriteriaList([recorder]),
            )
        generated = output.shape[1] - input_ids.shape[1]
        if generated != new_tokens or len(recorder.stamps) != new_tokens:
            raise RuntimeError(f"transformers generated {generated} tokens, expected {new_tokens}")
        return recorder.stamps

    def decode(self, prompt: list[int], num_tokens: int, desc: str = "decode") -> DecodeResult:
        ids = torch.tensor([prompt])
        stamps = self._generate(ids, torch.ones_like(ids), num_tokens + 1, desc)
        return decode_result(len(prompt), stamps, self.weight_bytes)

    def throughput(self, workload: Workload, desc: str = "throughput") -> ThroughputResult:
        width = max(len(p) for p in workload.prompts)
        input_ids = torch.full((workload.num_requests, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(workload.prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        synchronize(self.device)
        start = time.perf_counter()
        self._generate(input_ids, attention_mask, workload.max_output_len, desc)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        return ThroughputResult(
            num_requests=workload.num_requests,
            prompt_tokens=workload.prompt_tokens,
            output_tokens=workload.output_tokens,
            generated_tokens=workload.num_requests * workload.max_output_len,
            seconds=seconds,
        )

    def close(self) -> None:
        del self.model
        gc.collect()


class _TokenClock(StoppingCriteria):
    """A stopping criterion that never stops: generate calls it once per new token, after the token is chosen."""

    def __init__(self, device: torch.device, bar: tqdm) -> None:
        self.device = device
        self.bar = bar
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
