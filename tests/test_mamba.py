"""Mamba in the paged engine, against transformers' MambaForCausalLM (random init, float32): prefill
logits, greedy tokens under continuous batching, chunked prefill and preemption, and the state pool's
bookkeeping (a slot per running sequence, given back on finish, abort and preemption)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError, ModelConfig
from effinfer.layers import mamba as mamba_layer
from effinfer.layers.cache_spec import RecurrentStateSpec
from effinfer.layers.mamba import SCAN_CHUNK, SCAN_WINDOW, chunked_scan, sequential_scan
from effinfer.models.registry import family_for_gguf
from tests.conftest import copy_tokenizer

VOCAB = 512
PROMPT_LENGTHS = (5, 23, 11, 40)
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_mamba(tmp_path_factory):
    """A tiny random MambaForCausalLM saved with a tokenizer: (model, directory)."""
    config = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=3, conv_kernel=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).eval()
    # Larger weights than the default init make greedy decoding decisive; A_log, D and the dt bias
    # keep Mamba's own initialisation (a spread of decay rates).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif not name.endswith(("A_log", ".D", "dt_proj.bias")):
                p.normal_(0, 0.1 if p.dim() > 1 else 0.02)
    directory = tmp_path_factory.mktemp("mamba")
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    return model, directory


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, VOCAB, (n - 1,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def expected(hf_mamba, prompts):
    """transformers' greedy continuation of each prompt (no end token: greedy may pick it, as ours may)."""
    model, _ = hf_mamba
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(
                ids, generation_config=config, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            out.append(generated[0, len(prompt) :].tolist())
    return out


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", show_progress=False, **kwargs)


def _all_slots_free(llm: LLM) -> bool:
    blocks = llm.engine.block_manager
    return blocks.num_state_slots > 0 and blocks.num_free_state_slots == blocks.num_state_slots


def _run(
    llm: LLM, prompts, add_at: dict[int, list[int]], preempt_at: tuple[int, ...] = ()
) -> list[list[int]]:
    """Step the engine by hand: prompt i is added before step s for i in add_at[s]; at each step in
    ``preempt_at`` the most recently admitted running sequence is preempted. Returns tokens per prompt."""
    engine = llm.engine
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= max(add_at) or engine.has_unfinished_requests():
        for i in add_at.get(step, []):
            engine.add_request(prompts[i], GREEDY, request_id=str(i))
        if step in preempt_at and engine.scheduler.running:
            engine.scheduler.preempt(engine.scheduler.running[-1])
        for output in engine.step():
            tokens[output.request_id] = list(output.outputs[0].token_ids)
        step += 1
    return [tokens[str(i)] for i in range(len(prompts))]


def test_config_and_cache_specs(hf_mamba):
    model, _ = hf_mamba
    config = ModelConfig.from_hf(model.config.to_dict())
    assert config.intermediate_size == 128 and config.state_size == 8 and config.time_step_rank == 4
    llm_model = _llm(hf_mamba[1]).engine.model
    assert llm_model.cache_specs() == [RecurrentStateSpec((128, 3), (128, 8))] * 3


def test_prefill_logits_match_hf_whole_and_in_chunks(hf_mamba, prompts):
    model, path = hf_mamba
    llm = _llm(path)
    tokens = prompts[3]
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0, :-1]
        ours = llm.engine.model
        dense = ours.compute_logits(ours.forward_dense(torch.tensor([tokens])))[0, :-1]
    torch.testing.assert_close(dense, reference, rtol=0, atol=1e-4)
    for chunk in (len(tokens), 7, 1):  # the state carries from chunk to chunk
        ours = torch.cat(list(llm.engine.teacher_forced_logits(tokens, chunk=chunk)))
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    assert _all_slots_free(llm)


@pytest.mark.parametrize("length", [1, SCAN_CHUNK - 1, SCAN_CHUNK, 3 * SCAN_CHUNK + 5, 1000])
def test_chunked_scan_equals_the_sequential_scan(length):
    """Decays from ~1 (a long memory: states grow over 1000 tokens) to ~e^-100 per token (a
    cumulative-sum form would overflow float32), from a nonzero state, over whole and partial chunks."""
    gen = torch.Generator().manual_seed(length)
    decay = torch.exp(-torch.rand(length, 24, 8, generator=gen) * torch.logspace(-2, 2, 8))
    inputs = torch.randn(length, 24, 8, generator=gen)
    start = torch.randn(24, 8, generator=gen)
    reference = sequential_scan(decay, inputs, start)
    for chunk in (SCAN_CHUNK, 7):
        states = chunked_scan(decay.clone(), inputs.clone(), start.clone(), chunk)
        assert torch.isfinite(states).all()
        torch.testing.assert_close(states, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.fixture(scope="module")
def long_prompt(hf_mamba):
    """A 1000-token prompt with HF's logits (its sequential ``slow_forward``) and 4 greedy tokens."""
    model, _ = hf_mamba
    gen = torch.Generator().manual_seed(7)
    tokens = [1] + torch.randint(3, VOCAB, (999,), generator=gen).tolist()
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1]
        generated = model.generate(
            torch.tensor([tokens]),
            generation_config=config,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
    return tokens, logits, generated[0, len(tokens) :].tolist()


@pytest.mark.parametrize("scan", [sequential_scan, chunked_scan], ids=["sequential", "chunked"])
def test_long_prompt_matches_hf_across_scan_windows_and_prefill_chunks(
    hf_mamba, long_prompt, scan, monkeypatch
):
    """1000 tokens: several scan windows (and, chunked, many scan chunks) inside each engine prefill
    chunk of 300, the state carried across every kind of boundary; logits against HF's sequential
    ``slow_forward``, greedy tokens against HF ``generate`` with chunked prefill in the scheduler.
    Both scans run through the engine whatever the device would pick."""
    monkeypatch.setattr(mamba_layer, "scan_for", lambda device: scan)
    tokens, reference, expected = long_prompt
    assert len(tokens) > 3 * SCAN_WINDOW
    llm = _llm(hf_mamba[1], enable_chunked_prefill=True, max_num_batched_tokens=300)
    ours = torch.cat(list(llm.engine.teacher_forced_logits(tokens, chunk=300)))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert llm.generate([tokens], greedy)[0].outputs[0].token_ids == expected
    assert _all_slots_free(llm)


def test_greedy_batched_with_staggered_arrivals_matches_hf(hf_mamba, prompts, expected):
    llm = _llm(hf_mamba[1])
    assert _run(llm, prompts, {0: [0, 1], 3: [2], 5: [3]}) == expected
    assert _all_slots_free(llm)
    # The offline API, all at once: one batch of different lengths.
    outputs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert _all_slots_free(llm)


def test_greedy_matches_hf_under_preemption(hf_mamba, prompts, expected):
    llm = _llm(hf_mamba[1])
    # Preempted mid-decode and right after admission: the state is recomputed from the tokens, and
    # readmission may hand out another slot whose old contents must not leak in.
    assert _run(llm, prompts, {0: [0, 1, 2], 2: [3]}, preempt_at=(1, 4, 6, 9, 10)) == expected
    assert llm.engine.stats().num_preemptions >= 4
    assert _all_slots_free(llm)


def test_a_budget_of_two_states_runs_two_sequences_at_a_time(hf_mamba, prompts, expected):
    probe = _llm(hf_mamba[1])
    per_slot = probe.engine.runner.state_bytes_per_slot
    llm = _llm(hf_mamba[1], kv_cache_memory=2 * per_slot + per_slot // 2)
    engine = llm.engine
    assert engine.block_manager.num_state_slots == 2 and engine.runner.num_blocks == 0
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, GREEDY, request_id=str(i))
    tokens = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] = output.outputs[0].token_ids
        assert engine.num_running <= 2
    assert [tokens[str(i)] for i in range(len(prompts))] == expected
    assert _all_slots_free(llm)


def test_chunked_prefill_carries_the_state_across_chunks(hf_mamba, prompts, expected):
    llm = _llm(hf_mamba[1], enable_chunked_prefill=True, max_num_batched_tokens=8)
    assert _run(llm, prompts, {0: [0, 1], 2: [2, 3]}) == expected
    # Preempted in the middle of a chunked prompt, too.
    llm = _llm(hf_mamba[1], enable_chunked_prefill=True, max_num_batched_tokens=8)
    assert _run(llm, prompts, {0: [3], 1: [0, 1, 2]}, preempt_at=(2, 7)) == expected
    assert _all_slots_free(llm)


def test_abort_gives_the_state_slot_back(hf_mamba, prompts):
    llm = _llm(hf_mamba[1])
    engine = llm.engine
    engine.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=50), request_id="a")
    engine.add_request(prompts[2], SamplingParams(temperature=0, max_tokens=50), request_id="b")
    engine.step()
    engine.step()
    blocks = engine.block_manager
    assert blocks.num_free_state_slots == blocks.num_state_slots - 2
    engine.abort_request("a")
    assert blocks.num_free_state_slots == blocks.num_state_slots - 1
    engine.abort_request("b")
    assert _all_slots_free(llm) and not engine.has_unfinished_requests()


def test_repeated_prompts_get_no_stale_prefix_state(hf_mamba, prompts, expected):
    llm = _llm(hf_mamba[1], enable_prefix_caching=True)
    assert not llm.engine.block_manager.enable_prefix_caching
    outputs = llm.generate(prompts[:2] * 2, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected[:2] * 2


def test_speculative_decoding_and_gguf_are_refused_with_the_reason(hf_mamba):
    with pytest.raises(ConfigError, match="recurrent state"):
        _llm(hf_mamba[1], speculative_model="ngram")
    with pytest.raises(ConfigError, match="GGUF Mamba files are not supported"):
        family_for_gguf("mamba").hf_config_from_gguf("mamba", lambda name, default: default)
