"""Pipeline parallelism (models/stage.py, engine/pipeline.py) against one process.

The distributed tests spawn gloo processes on the CPU; each checks greedy tokens (and logits)
against the one-process engine on the same prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError, EngineConfig
from effinfer.engine.kv_cache import BlockManager
from effinfer.engine.pipeline import PipelineRunner, PipelineTopology, split_micro_batches
from effinfer.engine.runner import attention_layers
from effinfer.engine.scheduler import ScheduledSeq, Scheduler
from effinfer.engine.sequence import Sequence
from effinfer.layers.attention import DenseCausal
from effinfer.loading.checkpoint import open_checkpoint
from effinfer.models.stage import split_layers
from tests.conftest import make_hf_model

PROMPTS = [[1, 403, 261, 379], [1, 66, 301, 282, 260, 400, 299, 350, 284, 267, 262], [1, 73]]
MAX_TOKENS = 8
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


def test_stages_chained_in_one_process_give_the_whole_models_logits(tmp_path):
    """An untied head (the last stage loads lm_head, not the embedding) and the Qwen2 q/k/v biases."""
    _, path = make_hf_model("Qwen2ForCausalLM", tmp_path, tie_word_embeddings=False)
    checkpoint = open_checkpoint(path)
    tokens = torch.tensor([1, 45, 300, 7, 99, 260, 3])
    positions, meta = torch.arange(len(tokens)), DenseCausal(1, len(tokens))
    whole = checkpoint.load_model(torch.float32, CPU, 64, show_progress=False)
    expected = whole.compute_logits(whole(tokens, positions, meta))
    hidden = None
    for stage in split_layers(checkpoint.model_config.num_layers, 3):
        model = checkpoint.load_model(torch.float32, CPU, 64, show_progress=False, stage=stage)
        params = set(dict(model.named_parameters()))
        assert ("model.embed_tokens.weight" in params) == stage.is_first
        assert ("lm_head.weight" in params) == stage.is_last
        hidden = model(tokens, positions, meta, hidden_states=hidden)
    torch.testing.assert_close(model.compute_logits(hidden), expected)


def test_models_without_stage_support_are_refused():
    from effinfer.models.stage import keep_stage

    class NoStages(torch.nn.Module):
        supports_pipeline = False
        config = type("C", (), {"architecture": "MambaForCausalLM"})()

    with pytest.raises(ConfigError, match="MambaForCausalLM cannot be split into pipeline stages"):
        keep_stage(NoStages(), split_layers(2, 2)[0])


# ---------------------------------------------------------------- stages in separate processes


def _reference_tokens(model: Path, prompts, **engine_args) -> list[list[int]]:
    llm = LLM(str(model), device="cpu", dtype="float32", show_progress=False, **engine_args)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [o.outputs[0].token_ids for o in outputs]


def _lockstep_worker(rank: int, world: int, init_file: str, model: str, result_file: str) -> None:
    """Every rank schedules the same sequences (so block tables agree); the driver's greedy tokens are
    broadcast so every rank appends the same ones. The executor's job, done by hand for this test."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        checkpoint = open_checkpoint(model)
        stage = split_layers(checkpoint.model_config.num_layers, world)[rank]
        config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory=64 * 1024, show_progress=False)
        loaded = checkpoint.load_model(torch.float32, CPU, 128, show_progress=False, stage=stage)
        runner = PipelineRunner(
            loaded, checkpoint.model_config, config, CPU, torch.float32, 128, topology=PipelineTopology(stage)
        )
        blocks = BlockManager(runner.num_blocks, config.block_size, False, runner.layout.group_specs, 0)
        scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=4096)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        seqs = [Sequence(str(i), 0, p, params, config.block_size, MAX_TOKENS) for i, p in enumerate(PROMPTS)]
        for seq in seqs:
            scheduler.add(seq)
        first_logits = None
        while scheduler.has_unfinished():
            batch = scheduler.schedule()
            logits = runner.run(batch)
            if first_logits is None and logits is not None:
                first_logits = logits.clone()
            tokens = logits.argmax(-1).tolist() if logits is not None else None
            box = [tokens]
            dist.broadcast_object_list(box, src=0)
            sampling = [entry for entry in batch if entry.samples]
            for entry in batch:
                entry.seq.num_computed_tokens += entry.num_new_tokens
            for entry, token in zip(sampling, box[0]):
                entry.seq.token_ids.append(token)
                if entry.seq.num_output_tokens == MAX_TOKENS:
                    scheduler.finish(entry.seq)
        if rank == 0:
            torch.save(
                {
                    "tokens": [s.output_token_ids for s in seqs],
                    "first_logits": first_logits,
                    "num_blocks": runner.num_blocks,
                },
                result_file,
            )
    finally:
        dist.destroy_process_group()


def test_two_stages_give_the_tokens_and_logits_of_one_process(stories260k, tmp_path):
    result = tmp_path / "result.pt"
    mp.spawn(
        _lockstep_worker,
        args=(2, str(tmp_path / "init"), str(stories260k), str(result)),
        nprocs=2,
        join=True,
    )
    got = torch.load(result)
    assert got["tokens"] == _reference_tokens(stories260k, PROMPTS)
    # Prefill logits of each prompt's last token, as the one-process runner computes them.
    llm = LLM(str(stories260k), device="cpu", dtype="float32", show_progress=False)
    runner, blocks = llm.engine.runner, llm.engine.block_manager
    seqs = [Sequence(str(i), 0, p, SamplingParams(), 16, 1) for i, p in enumerate(PROMPTS)]
    for seq in seqs:
        blocks.allocate(seq, None, use_prefix_cache=False)
    expected = runner.run([ScheduledSeq(seq, len(seq)) for seq in seqs])
    torch.testing.assert_close(got["first_logits"], expected, rtol=1e-5, atol=1e-5)
    # Stage 0 holds 3 layers, stage 1 two: the smaller count of blocks is the one both keep.
    layer_bytes = 2 * 16 * 4 * 8 * 4  # K and V, 16 tokens, 4 KV heads of 8 floats
    assert got["num_blocks"] == 64 * 1024 // (3 * layer_bytes)
