"""One row of the report: a technique's model loaded once and measured the same way as every other.

The measurements are the existing commands' code: ``EffinferRunner`` of ``effinfer bench`` (its
warm-up, batch-1 decode and offline throughput on the same seeded random workloads, drawn in the
same order, so ``effinfer bench --concurrent 0`` with the same lengths sees the same prompts), a
prompt-only batch for prefill tokens/s, and ``perplexity`` of ``effinfer eval ppl`` on the text
(``paged_perplexity`` for techniques that change the KV cache, which the dense path never reads).
Memory is the weights as the model holds them plus the KV blocks one sequence of ``kv_tokens``
holds (``BlockManager.max_blocks_held``), so a sliding window's bounded cache shows.
"""

from __future__ import annotations

import random
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from effinfer.bench.throughput import EffinferRunner, weight_read_bytes
from effinfer.bench.workload import random_prompt, random_workload
from effinfer.eval.perplexity import paged_perplexity, perplexity
from effinfer.report.techniques import Target, Technique, engine_flags

# Engine settings `effinfer bench` has flags for; a row using only these gets a bench command line.
_BENCH_ENGINE_FIELDS = {"speculative_model", "num_speculative_tokens"}
STAGES = ("prepare", "load", "decode", "batched", "prefill", "perplexity")


@dataclass
class MeasureSettings:
    data: Path
    decode_tokens: int = 32
    decode_input_len: int = 32
    num_requests: int = 16
    input_len_range: tuple[int, int] = (32, 64)
    output_len_range: tuple[int, int] = (16, 32)
    prefill_requests: int = 4
    prefill_len: int = 128
    ppl_ctx: int = 512  # capped at the model's context
    ppl_windows: int = 8
    kv_tokens: int = 4096  # the sequence length memory is reported for (capped at the context)
    kv_cache_memory: int = 256 << 20
    dtype: str = "auto"
    threads: int | None = None
    seed: int = 0

    def flags(self) -> list[str]:
        """The report's own flags for these settings (what a row's reproducing `effinfer report` needs)."""
        out = [
            "--data", str(self.data), "--decode-tokens", str(self.decode_tokens),
            "--num-requests", str(self.num_requests), "--ppl-ctx", str(self.ppl_ctx),
            "--ppl-windows", str(self.ppl_windows), "--seed", str(self.seed),
        ]  # fmt: skip
        return out + (["--threads", str(self.threads)] if self.threads else [])


@dataclass
class Row:
    name: str
    label: str
    description: str
    status: str  # "measured", "error", "skipped", "not applicable"
    reason: str = ""  # why skipped / not applicable, or the error
    model: str = ""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    estimated_seconds: float = 0.0
    decode_tokens_per_s: float | None = None
    batched_tokens_per_s: float | None = None  # output tokens/s of the offline batch
    prefill_tokens_per_s: float | None = None
    weight_bytes: int | None = None
    kv_bytes: int | None = None  # one sequence of kv_tokens
    kv_tokens: int | None = None
    perplexity: float | None = None
    perplexity_method: str = ""  # "dense" (effinfer eval ppl) or "paged" (through the KV cache)
    # Through the paged KV cache: a cache technique's score, and the baseline's, to compare it with.
    paged_perplexity: float | None = None
    ppl_tokens: int | None = None
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None
    # The prompts and output lengths timed, as `effinfer bench --json` lists them for its scenarios
    # ("decode", "offline"), so a row's speed command can be checked to replay the same workload.
    workload: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int | None:
        return None if self.weight_bytes is None else self.weight_bytes + (self.kv_bytes or 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_bytes": self.memory_bytes}


def resident_weight_bytes(model: nn.Module, tied: bool) -> int:
    """Bytes of weights the model holds: what a decode step reads, plus an untied embedding table."""
    embeddings = sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Embedding)
    )
    return weight_read_bytes(model) + (0 if tied else embeddings)


def measure(
    technique: Technique, target: Target, settings: MeasureSettings, show_progress: bool,
    also_paged: bool = False,
) -> Row:  # fmt: skip
    """The technique's row; a failure becomes the row's error, never an exception. ``also_paged``
    adds the perplexity through the paged cache (the baseline's, when cache techniques follow)."""
    row = Row(technique.name, technique.label, technique.description, "measured")
    start = time.perf_counter()
    bar = tqdm(total=len(STAGES), desc=f"{technique.name:>16}", unit="stage", disable=not show_progress,
               leave=True)  # fmt: skip
    runner = None
    try:
        bar.set_postfix_str("prepare")
        prepared = technique.prepare(target)
        row.model, row.engine_kwargs = str(prepared.model), dict(prepared.engine_kwargs)
        row.commands = _commands(technique, target, settings, prepared.model, prepared.engine_kwargs,
                                 prepared.setup_commands)  # fmt: skip
        bar.update()
        bar.set_postfix_str("load")
        runner = EffinferRunner(
            str(prepared.model), dtype=settings.dtype, device=target.device, num_threads=settings.threads,
            max_num_seqs=max(settings.num_requests, 1), show_progress=False,
            kv_cache_memory=settings.kv_cache_memory, **prepared.engine_kwargs,
        )  # fmt: skip
        _measure_loaded(runner, technique, settings, row, bar, also_paged)
    except Exception as e:  # noqa: BLE001 -- a technique's failure is reported in its row
        row.status = "error"
        row.reason = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        if runner is not None:
            runner.close()
        bar.close()
    row.seconds = time.perf_counter() - start
    return row


def _measure_loaded(
    runner: EffinferRunner, technique: Technique, s: MeasureSettings, row: Row, bar, also_paged: bool
) -> None:
    engine = runner.engine
    vocab, max_len = engine.model_config.vocab_size, engine.max_model_len
    # The draws of `effinfer bench` (suite.py) with --concurrent 0, in its order; then the prefill batch.
    rng = random.Random(s.seed)
    decode_warmup = random_prompt(rng, s.decode_input_len, vocab)
    decode_prompt = random_prompt(rng, s.decode_input_len, vocab)
    warmup = random_workload("warmup", rng, 4, (8, 32), (4, 8), vocab)
    offline = random_workload("offline", rng, s.num_requests, s.input_len_range, s.output_len_range, vocab)
    prefill_len = min(s.prefill_len, max_len - 1)
    prefill = random_workload("prefill", rng, s.prefill_requests, (prefill_len,) * 2, (1, 1), vocab)
    row.workload = {
        "decode": {"prompt_lens": [len(decode_prompt)], "output_lens": [s.decode_tokens + 1]},
        "offline": {
            "prompt_lens": [len(p) for p in offline.prompts],
            "output_lens": list(offline.output_lens),
        },
    }
    bar.update()

    bar.set_postfix_str("decode")
    runner.decode(decode_warmup, min(8, s.decode_tokens))
    runner.throughput(warmup)
    row.decode_tokens_per_s = runner.decode(decode_prompt, s.decode_tokens).tokens_per_s
    bar.update()
    bar.set_postfix_str("batched")
    row.batched_tokens_per_s = runner.throughput(offline).output_tokens_per_s
    bar.update()
    bar.set_postfix_str("prefill")
    result = runner.throughput(prefill)
    row.prefill_tokens_per_s = result.prompt_tokens / result.seconds
    if technique.speculative:
        stats = engine.stats()
        row.acceptance_rate = stats.spec_acceptance_rate
        row.mean_accepted_length = stats.spec_mean_accepted_length
    row.weight_bytes = resident_weight_bytes(engine.model, engine.model_config.tie_word_embeddings)
    row.kv_tokens = min(s.kv_tokens, max_len)
    row.kv_bytes = engine.block_manager.max_blocks_held(row.kv_tokens, 1) * engine.runner.kv_bytes_per_block
    bar.update()

    bar.set_postfix_str("perplexity")
    ctx = min(s.ppl_ctx, max_len)
    if technique.scores_through_cache or also_paged:
        paged = paged_perplexity(runner.llm, path=s.data, ctx=ctx, max_windows=s.ppl_windows,
                                 chunk=max(1, ctx // 4), show_progress=False)  # fmt: skip
        row.paged_perplexity = paged.perplexity
    if technique.scores_through_cache:
        result, row.perplexity_method = paged, "paged"
    else:
        result = perplexity(runner.llm, path=s.data, ctx=ctx, max_windows=s.ppl_windows, show_progress=False)
        row.perplexity_method = "dense"
    row.perplexity, row.ppl_tokens = result.perplexity, result.num_tokens
    bar.update()


def _commands(
    technique: Technique, target: Target, s: MeasureSettings, model: Path, engine_kwargs: dict,
    setup: list[str],
) -> dict[str, str]:  # fmt: skip
    """Command lines that reproduce the row: the whole row, and its parts with the plain commands."""
    common = engine_flags({"dtype": s.dtype, "device": target.device, "num_threads": s.threads})
    out = {"row": shlex.join(["effinfer", "report", "--model", str(target.model), "--techniques",
                              technique.name, "--out", "DIR", *s.flags()])}  # fmt: skip
    if setup:
        out["setup"] = "\n".join(setup)
    if not technique.scores_through_cache:
        out["perplexity"] = shlex.join([
            "effinfer", "eval", "ppl", "--model", str(model), "--data", str(s.data),
            "--ctx", str(min(s.ppl_ctx, target.config.max_position_embeddings)),
            "--max-windows", str(s.ppl_windows), *common,
            *engine_flags({"kv_cache_memory": s.kv_cache_memory, **engine_kwargs}),
        ])  # fmt: skip
    if set(engine_kwargs) <= _BENCH_ENGINE_FIELDS:
        (ilo, ihi), (olo, ohi) = s.input_len_range, s.output_len_range
        speculative = ["--speculative-model", engine_kwargs["speculative_model"]] if engine_kwargs else []
        out["speed"] = shlex.join([
            "effinfer", "bench", "--model", str(model), "--batch-decode-tokens", str(s.decode_tokens),
            "--decode-input-len", str(s.decode_input_len), "--num-requests", str(s.num_requests),
            "--input-len-range", f"{ilo}:{ihi}", "--output-len-range", f"{olo}:{ohi}",
            "--concurrent", "0", "--seed", str(s.seed), *common, *speculative,
        ])  # fmt: skip
    return out
