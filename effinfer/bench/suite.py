"""The default benchmark suite: the same seeded workloads, run by effinfer and then by the peer.

Scenarios, each after a warm-up:
  decode      batch-1 decode tokens/s and weight-read bandwidth, prefill excluded
  offline     N requests with random prompt and output lengths, all submitted at once
  concurrent  C requests of one prompt length and one output length (no padding waste for a peer)
Both engines are loaded at once and take turns, scenario by scenario, on the same threads and
workloads; ``sequential`` instead frees effinfer before loading the peer, for models that do not fit twice.
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from effinfer.bench.report import ENGINE, BenchReport, Scenario, machine_info
from effinfer.bench.throughput import EffinferRunner
from effinfer.bench.workload import Workload, random_prompt, random_workload

PEERS = ("hf",)


class BenchError(ValueError):
    """The benchmark settings cannot be run on this model; the message says why."""


@dataclass
class BenchSettings:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    compare: str | None = None
    threads: int | None = None
    batch_decode_tokens: int = 64
    decode_input_len: int = 32
    num_requests: int = 16
    input_len_range: tuple[int, int] = (32, 128)
    output_len_range: tuple[int, int] = (16, 64)
    concurrent: int = 16
    concurrent_input_len: int = 64
    concurrent_output_len: int = 32
    seed: int = 0
    # Load the peer only after effinfer is freed (for models too big to hold twice); else interleave.
    sequential: bool = False
    show_progress: bool = True
    speculative_model: str | None = None  # effinfer only (docs/speculative-decoding.md)
    num_speculative_tokens: int | None = None
    tensor_parallel_size: int = 1  # effinfer only (engine/executor.py)
    pipeline_parallel_size: int = 1


@dataclass
class _Workloads:
    decode_warmup: list[int]
    decode: list[int]
    warmup: Workload
    offline: Workload
    concurrent: Workload | None


def run_suite(settings: BenchSettings, command: str) -> BenchReport:
    s = settings
    if s.compare is not None and s.compare not in PEERS:
        raise BenchError(f"unknown peer {s.compare!r}; choose from {', '.join(PEERS)}")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    _log(s, f"[{ENGINE}] loading {s.model}")
    ours = EffinferRunner(
        s.model,
        dtype=s.dtype,
        device=s.device,
        num_threads=s.threads,
        max_num_seqs=max(s.num_requests, s.concurrent, 1),
        show_progress=s.show_progress,
        speculative_model=s.speculative_model,
        tensor_parallel_size=s.tensor_parallel_size,
        pipeline_parallel_size=s.pipeline_parallel_size,
        # Unset: EngineConfig's default.
        **({} if s.num_speculative_tokens is None else {"num_speculative_tokens": s.num_speculative_tokens}),
    )
    engine = ours.engine
    device, dtype, threads = ours.device, ours.dtype, torch.get_num_threads()
    workloads = _make_workloads(s, engine.model_config.vocab_size, engine.max_model_len)
    model = {
        "path": str(Path(s.model).resolve()),
        "architecture": engine.model_config.architecture,
        "parameters": ours.num_parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes_per_decode_step": ours.weight_bytes,
    }
    scenarios = _scenarios(s, workloads)

    def load_peer():
        from effinfer.bench.hf import HFRunner

        _log(s, f"[HF] loading {s.model} with transformers")
        return HFRunner(s.model, dtype, device, threads, show_progress=s.show_progress)

    peer = None
    if s.compare is None:
        _measure([ours], scenarios, workloads, s)
    elif s.sequential:
        _measure([ours], scenarios, workloads, s)
        ours.close()
        ours = None
        peer = load_peer()
        _measure([peer], scenarios, workloads, s)
    else:
        # Both loaded, each scenario run back to back by both: drifting background load then
        # touches both sides of a ratio alike.
        peer = load_peer()
        _measure([ours, peer], scenarios, workloads, s)
    if s.speculative_model is not None and ours is not None:
        stats = ours.engine.stats()
        model["spec_acceptance_rate"] = stats.spec_acceptance_rate
        model["spec_mean_accepted_length"] = stats.spec_mean_accepted_length
    for runner in (ours, peer):
        if runner is not None:
            runner.close()

    return BenchReport(
        command=command,
        date=date,
        machine=machine_info(device, threads, None if peer is None else peer.version),
        model=model,
        settings={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        peer=None if peer is None else peer.name,
        scenarios=scenarios,
    )


def _make_workloads(s: BenchSettings, vocab_size: int, max_model_len: int) -> _Workloads:
    for name, value in [
        ("--batch-decode-tokens", s.batch_decode_tokens),
        ("--decode-input-len", s.decode_input_len),
        ("--num-requests", s.num_requests),
    ]:
        if value < 1:
            raise BenchError(f"{name} must be at least 1, got {value}")
    if s.concurrent < 0:
        raise BenchError(f"--concurrent must be 0 (skip) or more, got {s.concurrent}")
    longest = [
        ("batch-1 decode", s.decode_input_len + s.batch_decode_tokens + 1),
        ("offline", s.input_len_range[1] + s.output_len_range[1]),
    ]
    if s.concurrent:
        longest.append(("concurrent", s.concurrent_input_len + s.concurrent_output_len))
    for name, length in longest:
        if length > max_model_len:
            raise BenchError(
                f"the {name} scenario needs sequences of {length} tokens, more than the model's "
                f"context of {max_model_len}; shorten its lengths"
            )
    rng = random.Random(s.seed)
    concurrent = None
    if s.concurrent:
        lengths = (s.concurrent_input_len, s.concurrent_input_len)
        outputs = (s.concurrent_output_len, s.concurrent_output_len)
        concurrent = random_workload("concurrent", rng, s.concurrent, lengths, outputs, vocab_size)
    return _Workloads(
        decode_warmup=random_prompt(rng, s.decode_input_len, vocab_size),
        decode=random_prompt(rng, s.decode_input_len, vocab_size),
        warmup=random_workload("warmup", rng, 4, (8, 32), (4, 8), vocab_size),
        offline=random_workload(
            "offline", rng, s.num_requests, s.input_len_range, s.output_len_range, vocab_size
        ),
        concurrent=concurrent,
    )


def _scenarios(s: BenchSettings, w: _Workloads) -> list[Scenario]:
    (ilo, ihi), (olo, ohi) = s.input_len_range, s.output_len_range
    out = [
        Scenario(
            "decode",
            "batch-1 decode",
            f"prompt {len(w.decode)}, {s.batch_decode_tokens} tokens",
            [len(w.decode)],
            [s.batch_decode_tokens + 1],
        ),
        Scenario(
            "offline",
            f"offline, {s.num_requests} requests",
            f"prompts {_span(ilo, ihi)}, outputs {_span(olo, ohi)} tokens",
            [len(p) for p in w.offline.prompts],
            list(w.offline.output_lens),
        ),
    ]
    if w.concurrent is not None:
        out.append(
            Scenario(
                "concurrent",
                f"{s.concurrent} concurrent",
                f"prompts {s.concurrent_input_len}, outputs {s.concurrent_output_len} tokens",
                [len(p) for p in w.concurrent.prompts],
                list(w.concurrent.output_lens),
            )
        )
    return out


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _measure(runners: list, scenarios: list[Scenario], w: _Workloads, s: BenchSettings) -> None:
    by_key = {sc.key: sc for sc in scenarios}
    for runner in runners:
        _log(s, f"[{runner.name}] warm-up")
        runner.decode(w.decode_warmup, min(8, s.batch_decode_tokens), desc=f"{runner.name} warm-up decode")
        runner.throughput(w.warmup, desc=f"{runner.name} warm-up batch")
    for runner in runners:
        by_key["decode"].results[runner.name] = runner.decode(
            w.decode, s.batch_decode_tokens, desc=f"{runner.name} decode"
        )
    for runner in runners:
        by_key["offline"].results[runner.name] = runner.throughput(w.offline, desc=f"{runner.name} offline")
    if w.concurrent is not None:
        for runner in runners:
            by_key["concurrent"].results[runner.name] = runner.throughput(
                w.concurrent, desc=f"{runner.name} concurrent"
            )


def _log(s: BenchSettings, message: str) -> None:
    if s.show_progress:
        print(message, file=sys.stderr, flush=True)
