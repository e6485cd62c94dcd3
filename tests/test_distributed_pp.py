"""Pipeline parallelism (models/stage.py, engine/pipeline.py) against one process.

The distributed tests spawn gloo processes on the CPU; each checks greedy tokens (and logits)
against the one-process engine on the same prompts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError, EngineConfig, ModelConfig
from effinfer.convert import convert_to_gguf
from effinfer.engine.executor import check_parallel_config
from effinfer.engine.pipeline import pipeline_bytes, reset_pipeline_bytes, split_micro_batches
from effinfer.engine.runner import attention_layers
from effinfer.engine.scheduler import ScheduledSeq
from effinfer.engine.sequence import Sequence
from effinfer.eval.perplexity import perplexity
from effinfer.layers.attention import DenseCausal
from effinfer.loading.checkpoint import open_checkpoint
from effinfer.models.stage import split_layers
from tests.conftest import make_hf_model

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the split rules


def test_layers_split_evenly_with_the_remainder_on_early_stages():
    for num_layers, num_stages in [(5, 2), (30, 4), (7, 3), (4, 4)]:
        stages = split_layers(num_layers, num_stages)
        sizes = [len(s.layers) for s in stages]
        assert [s.first_layer for s in stages[1:]] == [s.stop_layer for s in stages[:-1]]
        assert stages[0].first_layer == 0 and stages[-1].stop_layer == num_layers
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert stages[0].is_first and stages[-1].is_last
    with pytest.raises(ConfigError, match="exceeds the model's 5 decoder layers"):
        split_layers(5, 6)


def _scheduled(lengths: list[int]) -> list[ScheduledSeq]:
    params = SamplingParams(max_tokens=1)
    return [ScheduledSeq(Sequence("r", 0, [1] * n, params, 16, 1), n) for n in lengths]


def test_micro_batches_are_consecutive_whole_sequences_of_similar_size():
    batch = _scheduled([1] * 8)
    parts = split_micro_batches(batch, 2)
    assert [len(p) for p in parts] == [4, 4]
    assert [e for p in parts for e in p] == batch
    # One long prefill and short decodes: the long one is a micro-batch of its own.
    batch = _scheduled([40, 1, 1, 1])
    assert [len(p) for p in split_micro_batches(batch, 2)] == [1, 3]
    assert len(split_micro_batches(_scheduled([5]), 4)) == 1  # never an empty micro-batch
    assert [len(p) for p in split_micro_batches(_scheduled([1] * 5), 3)] == [2, 2, 1]


@pytest.mark.parametrize("num_stages", [2, 3])
def test_a_stage_holds_only_its_layers_and_cache(stories260k, num_stages):
    checkpoint = open_checkpoint(stories260k)
    whole = checkpoint.load_model(torch.float32, CPU, 64, show_progress=False)
    whole_params = dict(whole.named_parameters())
    stages = split_layers(checkpoint.model_config.num_layers, num_stages)
    seen = set()
    for stage in stages:
        model = checkpoint.load_model(torch.float32, CPU, 64, show_progress=False, stage=stage)
        params = dict(model.named_parameters())
        layer_ids = {int(n.split(".")[2]) for n in params if n.startswith("model.layers.")}
        assert layer_ids == set(stage.layers)
        assert len(attention_layers(model)) == len(stage.layers)
        for name, param in params.items():
            assert torch.equal(param, whole_params[name]), name
        seen |= set(params)
        # stories260K ties its embeddings: the last stage keeps the table as its head's weight.
        assert ("model.embed_tokens.weight" in params) == (stage.is_first or stage.is_last)
        assert ("model.norm.weight" in params) == stage.is_last
    assert seen == set(whole_params)


@pytest.mark.parametrize("source", ["untied Qwen2", "Q8_0 GGUF"])
def test_stages_chained_in_one_process_give_the_whole_models_logits(tmp_path, stories260k, source):
    """An untied head (the last stage loads lm_head, not the embedding) with Qwen2's q/k/v biases; and
    a GGUF file whose Q8_0 blocks stay quantized (a stage decodes its own tensors only)."""
    if source == "untied Qwen2":
        path = make_hf_model("Qwen2ForCausalLM", tmp_path, tie_word_embeddings=False)[1]
    else:
        path = convert_to_gguf(stories260k, tmp_path / "stories260K-q8_0.gguf", "q8_0")
    checkpoint = open_checkpoint(path)
    tied = checkpoint.model_config.tie_word_embeddings
    tokens = torch.tensor([1, 45, 300, 7, 99, 260, 3])
    positions, meta = torch.arange(len(tokens)), DenseCausal(1, len(tokens))
    whole = checkpoint.load_model(torch.float32, CPU, 64, show_progress=False)
    expected = whole.compute_logits(whole(tokens, positions, meta))
    hidden = None
    for stage in split_layers(checkpoint.model_config.num_layers, 3):
        model = checkpoint.load_model(torch.float32, CPU, 64, show_progress=False, stage=stage)
        # Tensors by owner (a GGUF file's embedding is a quantized table, its tied head packed codes).
        held = {name.rsplit(".", 1)[0] for name, _ in [*model.named_parameters(), *model.named_buffers()]}
        holds_embedding = any(name.startswith("model.embed_tokens") for name in held)
        holds_head = any(name.startswith("lm_head") for name in held) or (tied and holds_embedding)
        if not stage.is_last:  # the last stage of a tied model may keep the table for its head
            assert holds_embedding == stage.is_first
        assert holds_head == (stage.is_last or (tied and stage.is_first))
        hidden = model(tokens, positions, meta, hidden_states=hidden)
    torch.testing.assert_close(model.compute_logits(hidden), expected)


def test_what_pipeline_parallelism_cannot_run_is_refused_before_any_process_starts(stories260k):
    hf = transformers.MambaConfig(vocab_size=512, hidden_size=64, state_size=8, num_hidden_layers=3).to_dict()
    mamba = ModelConfig.from_hf({**hf, "architectures": ["MambaForCausalLM"]})
    with pytest.raises(ConfigError, match="MambaForCausalLM cannot be split into pipeline stages"):
        check_parallel_config(mamba, EngineConfig(device="cpu", pipeline_parallel_size=2))
    with pytest.raises(ConfigError, match="exceeds the model's 5 decoder layers"):
        LLM(str(stories260k), device="cpu", pipeline_parallel_size=6, show_progress=False)


# ---------------------------------------------------------------- the engine under --pipeline-parallel-size

STORY_PROMPTS = [
    "Once upon a time, there was a little dog named Max. He liked to run in the park",
    "Once upon a time, there was a little dog named Max. One day",
    "Tom and Sue went to the park.",
    "A cat",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=16, n=2, ignore_eos=True)
SCORED_IDS = [1, 403, 261, 379, 66, 301, 282, 260, 400, 299, 350, 284]


class Run(NamedTuple):
    greedy: list  # token ids of each greedy completion
    seeded: list  # token ids of each seeded sample (two per prompt)
    scored: torch.Tensor  # teacher-forced logits of the first prompt
    scoring_bytes: dict  # what the driver moved between stages while scoring
    perplexity: float  # eval's perplexity over overlapping windows
    stats: object


def _run(model: Path, **engine_args) -> Run:
    llm = LLM(str(model), device="cpu", dtype="float32", show_progress=False, **engine_args)
    try:
        greedy = [o.outputs[0].token_ids for o in llm.generate(STORY_PROMPTS * 2, GREEDY)]
        seeded = [[c.token_ids for c in o.outputs] for o in llm.generate(STORY_PROMPTS[:2], SEEDED)]
        reset_pipeline_bytes()
        scored = torch.cat(list(llm.engine.teacher_forced_logits(SCORED_IDS, chunk=5)))
        moved = pipeline_bytes()
        ppl = perplexity(llm, token_ids=SCORED_IDS * 3, ctx=16, stride=8, show_progress=False).perplexity
        return Run(greedy, seeded, scored, moved, ppl, llm.engine.stats())
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def one_process(stories260k):
    return _run(stories260k)


def _assert_same(run: Run, one_process: Run) -> None:
    assert run.greedy == one_process.greedy
    assert run.seeded == one_process.seeded
    torch.testing.assert_close(run.scored, one_process.scored, rtol=1e-5, atol=1e-5)
    # Scoring runs every token but the last: one 64-float hidden state each to the next stage, one
    # 512-float row of logits each back to the driver.
    rows = len(SCORED_IDS) - 1
    assert run.scoring_bytes == {"hidden_sent": rows * 64 * 4, "logits_received": rows * 512 * 4}
    assert one_process.scoring_bytes == {}
    assert run.perplexity == pytest.approx(one_process.perplexity, rel=1e-5)


@pytest.mark.slow
def test_pipeline_parallel_2_matches_one_process_with_prefix_caching_and_preemption(stories260k, one_process):
    # 8 blocks on the 3-layer stage: the 8 sequences cannot all hold their 3-4 blocks at once.
    per_block = 2 * 3 * 16 * 4 * 8 * 4
    run = _run(stories260k, pipeline_parallel_size=2, kv_cache_memory=8 * per_block)
    _assert_same(run, one_process)
    assert run.stats.num_blocks == 8
    assert run.stats.num_preemptions > 0 and run.stats.prefix_cache_hits > 0


@pytest.mark.slow
def test_tensor_parallel_2_by_pipeline_parallel_2_matches_one_process(stories260k, one_process):
    """4 ranks; chunked prefill makes micro-batches that sample no row (a prompt's first chunks)."""
    chunked = dict(enable_chunked_prefill=True, max_num_batched_tokens=8)
    _assert_same(_run(stories260k, tensor_parallel_size=2, pipeline_parallel_size=2, **chunked), one_process)


@pytest.mark.slow
def test_speculative_decoding_under_pipeline_parallelism(stories260k, one_process):
    """Prompt lookup; and a draft model (the driver runs it whole, in its own process) over three
    stages, the middle one holding neither embedding nor head."""
    run = _run(stories260k, pipeline_parallel_size=2, speculative_model="ngram")
    assert run.greedy == one_process.greedy
    assert run.stats.num_draft_tokens > 0 and run.stats.num_accepted_tokens > 0
    pinned = dict(num_speculative_tokens=3, speculative_adaptive=False)
    run = _run(stories260k, pipeline_parallel_size=3, speculative_model=str(stories260k), **pinned)
    assert run.greedy == one_process.greedy
    assert run.stats.num_draft_tokens > 0 and run.stats.num_accepted_tokens > 0


@pytest.mark.slow
def test_cli_generate_with_pipeline_parallel_2(stories260k):
    """The flag through the command line, in a process of its own (its workers leave with it)."""
    command = [
        sys.executable,
        "-c",
        "import sys; from effinfer.cli import main; sys.exit(main(sys.argv[1:]))",
    ]
    command += ["generate", "Once upon a time", "--model", str(stories260k), "--max-tokens", "16"]
    command += ["--temperature", "0", "--ignore-eos", "--dtype", "float32"]
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's effinfer, whatever is installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    texts = [
        subprocess.run(
            command + extra, capture_output=True, text=True, timeout=300, check=True, env=env
        ).stdout
        for extra in ([], ["--pipeline-parallel-size", "2"])
    ]
    assert texts[0].startswith("Once upon a time") and len(texts[0]) > len("Once upon a time") + 10
    assert texts[1] == texts[0]
