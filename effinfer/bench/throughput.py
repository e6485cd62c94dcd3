"""The measurements: batch-1 decode speed and offline throughput, for effinfer and, through the same
interface, for a peer engine (``hf.py``), so that every number has a same-run counterpart.

Batch-1 decode times only the decode: the clock starts when the prefill step has produced the
first token and stops at the last one, so N decode steps give N / elapsed tokens/s. Its weight
bandwidth is the bytes of weights one decode step reads (every parameter once; the embedding table
is skipped, since a step reads one row of it, unless it is tied to the output projection) times
tokens/s. Offline throughput submits all requests at once and times until the last one finishes.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from effinfer.bench.workload import Workload
from effinfer.engine.llm import LLM
from effinfer.sampling_params import SamplingParams


@dataclass
class DecodeResult:
    prompt_tokens: int
    decode_tokens: int
    seconds: float
    tokens_per_s: float
    median_ms_per_token: float
    weight_bytes_per_step: int
    weight_gb_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ThroughputResult:
    num_requests: int
    prompt_tokens: int
    output_tokens: int  # the tokens the requests asked for
    generated_tokens: int  # the tokens the engine computed (more than output_tokens if it pads)
    seconds: float
    prefix_cache_hit_tokens: int = 0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
            "generated_tokens_per_s": self.generated_tokens_per_s,
        }


def _unique_parameters(model: nn.Module, skip_embeddings: bool) -> int:
    """(elements, bytes) of the model's weights, each tensor once; effinfer Linear layers are
    counted by shape, since their plain weight may have been released after prepacking."""
    from effinfer.layers.linear import Linear

    seen: set[int] = set()
    elements = nbytes = 0
    for module in model.modules():
        if skip_embeddings and isinstance(module, nn.Embedding):
            continue
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            count = module.num_parameters() if isinstance(module, Linear) and param is module.weight else None
            if isinstance(module, Linear) and param is module.bias:
                continue  # counted with the weight
            count = param.numel() if count is None else count
            elements += count
            if isinstance(module, Linear) and param is module.weight:
                nbytes += module.weight_nbytes()
            else:
                nbytes += count * param.element_size()
    return elements, nbytes


def weight_read_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: each parameter once (tied ones once); an embedding
    table only if some other module (a tied lm_head) also uses it, since a lookup reads one row."""
    return _unique_parameters(model, skip_embeddings=True)[1]


def parameter_count(model: nn.Module) -> int:
    return _unique_parameters(model, skip_embeddings=False)[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_result(prompt_tokens: int, stamps: list[float], weight_bytes: int) -> DecodeResult:
    """``stamps[i]`` is when token i was ready; token 0 came from the prefill and is not counted."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    seconds = stamps[-1] - stamps[0]
    tokens_per_s = len(steps) / seconds
    return DecodeResult(
        prompt_tokens=prompt_tokens,
        decode_tokens=len(steps),
        seconds=seconds,
        tokens_per_s=tokens_per_s,
        median_ms_per_token=statistics.median(steps) * 1e3,
        weight_bytes_per_step=weight_bytes,
        weight_gb_per_s=weight_bytes * tokens_per_s / 1e9,
    )


class EffinferRunner:
    name = "effinfer"

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: str = "auto",
        num_threads: int | None = None,
        max_num_seqs: int = 64,
        show_progress: bool = True,
        **engine_args,
    ) -> None:
        self.llm = LLM(
            model_path,
            dtype=dtype,
            device=device,
            num_threads=num_threads,
            max_num_seqs=max_num_seqs,
            show_progress=show_progress,
            **engine_args,
        )
        self.engine = self.llm.engine
        self.device = self.engine.device
        self.dtype = self.engine.dtype
        self.show_progress = show_progress
        self.weight_bytes = weight_read_bytes(self.engine.model)
        self.num_parameters = parameter_count(self.engine.model)

    def decode(self, prompt: list[int], num_tokens: int, desc: str = "decode") -> DecodeResult:
        engine = self.engine
        if engine.has_unfinished_requests():
            raise RuntimeError("the decode benchmark needs an idle engine")
        params = SamplingParams(temperature=0, max_tokens=num_tokens + 1, ignore_eos=True)
        engine.add_request(prompt, params)
        stamps: list[float] = []
        num_generated = 0
        with tqdm(total=num_tokens + 1, desc=desc, unit="tok", disable=not self.show_progress) as bar:
            while engine.has_unfinished_requests():
                outputs = engine.step()
                synchronize(self.device)
                now = time.perf_counter()
                for output in outputs:
                    num_generated = len(output.outputs[0].token_ids)
                # A speculative step may bring several tokens: each is stamped when its step ended.
                bar.update(num_generated - len(stamps))
                stamps.extend([now] * (num_generated - len(stamps)))
        if num_generated != num_tokens + 1 or len(stamps) != num_tokens + 1:
            raise RuntimeError(
                f"expected one prefill and {num_tokens} decode steps, got {len(stamps)} steps "
                f"and {num_generated} tokens"
            )
        return decode_result(len(prompt), stamps, self.weight_bytes)

    def throughput(self, workload: Workload, desc: str = "throughput") -> ThroughputResult:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
        if self.show_progress:
            print(f"{desc}: {workload.num_requests} requests", flush=True, file=sys.stderr)
        synchronize(self.device)
        start = time.perf_counter()
        outputs = self.llm.generate(workload.prompts, params, use_tqdm=self.show_progress)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        produced = [len(o.outputs[0].token_ids) for o in outputs]
        if produced != workload.output_lens:
            raise RuntimeError("effinfer produced a different number of tokens than requested")
        return ThroughputResult(
            num_requests=workload.num_requests,
            prompt_tokens=workload.prompt_tokens,
            output_tokens=sum(produced),
            generated_tokens=sum(produced),
            seconds=seconds,
            prefix_cache_hit_tokens=sum(o.num_cached_tokens for o in outputs),
        )

    def close(self) -> None:
        self.llm.shutdown()  # tensor-parallel workers, if any
        del self.engine, self.llm
        gc.collect()
