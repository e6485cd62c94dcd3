"""Gemma 3 against transformers: random-initialised ``Gemma3ForCausalLM`` models (float32, tiny, an
8-token sliding window with global layers between) must give HF's logits and HF's greedy tokens over
sequences many windows long, batched, with prefix caching on and off.
"""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.config import ModelConfig

from .conftest import TINY, copy_tokenizer

WINDOW = 8
# Two configs: the pattern from layer_types, the default rope and no soft-capping; and the pattern
# from sliding_window_pattern, linear rope scaling of the global layers and final soft-capping.
CONFIGS = {
    "layer_types": dict(
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_theta=50_000.0,
        rope_local_base_freq=100.0,
    ),
    "pattern_scaled_capped": dict(
        sliding_window_pattern=3,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=3.0,
    ),
}
BASE = [1] + list(range(40, 76))  # 37 tokens: several windows, and a prefix the next prompt shares
PROMPTS = [BASE, [1, 17, 99, 305], BASE + [300, 301, 302, 303, 304, 305, 306, 307, 308], [1, 400, 7, 8, 9]]
NEW_TOKENS = 40


def make_gemma3(directory, **overrides):
    import transformers

    kwargs = {
        **TINY,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,  # not head_dim: the attention scale must come from it
        "sliding_window": WINDOW,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **overrides,
    }
    config = transformers.Gemma3TextConfig(**kwargs)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms are offsets from one: spread them around zero
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else (0.08 if p.dim() > 1 else 0.02))
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_and_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return make_gemma3(path, **CONFIGS[request.param]), path


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", show_progress=False, block_size=4, **kwargs)


def test_config_reads_windows_and_rope(hf_and_path):
    hf, path = hf_and_path
    config = ModelConfig.from_dir(path)
    expected = [WINDOW if t == "sliding_attention" else None for t in hf.config.layer_types]
    assert config.sliding_windows == expected and None in expected and WINDOW in expected
    assert config.query_pre_attn_scalar == 24
    assert config.rope_theta == hf.config.rope_parameters["full_attention"]["rope_theta"]
    assert config.rope_local_theta == hf.config.rope_parameters["sliding_attention"]["rope_theta"]


def test_prefill_logits_match_hf(hf_and_path):
    """Every position's logits; the third prompt's shared prefix comes from the prefix cache, so
    only its last positions are computed, over cached keys of local and global layers."""
    hf, path = hf_and_path
    llm = _llm(path)
    computed = []
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0]
        ours = _all_position_logits(llm, prompt)
        computed.append(len(ours))
        assert (ours - expected[-len(ours) :]).abs().max().item() < 1e-4
    assert computed[2] < len(PROMPTS[2]) and computed[0] == len(PROMPTS[0])


def _all_position_logits(llm, prompt):
    from effinfer.engine.sequence import Sequence

    engine = llm.engine
    seq = Sequence("probe", 0, prompt, SamplingParams(), engine.config.block_size, 1)
    engine.block_manager.allocate(seq)
    try:
        input_ids, positions, meta, _ = engine.runner.prepare_prefill([seq])
        with torch.inference_mode():
            hidden = engine.runner.model(input_ids, positions, meta)
            return engine.runner.model.compute_logits(hidden).float()
    finally:
        engine.block_manager.free(seq)


def test_dense_forward_matches_hf(hf_and_path):
    hf, path = hf_and_path
    model = _llm(path).engine.runner.model
    batch = torch.tensor([BASE[:30], PROMPTS[2][-30:]])
    with torch.no_grad():
        expected = hf(batch).logits
        ours = model.compute_logits(model.forward_dense(batch)).float()
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_hf_generate(hf_and_path, prefix_caching):
    """Prompts of different lengths join the batch at different steps; the third shares the first's
    37-token prefix, which prefix caching serves from cache (blocks of 4 tokens, window 8)."""
    hf, path = hf_and_path
    llm = _llm(path, enable_prefix_caching=prefix_caching)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
        expected.append(out[0, len(prompt) :].tolist())
    finished, ids, step = {}, [], 0
    while len(finished) < len(PROMPTS):
        if step % 3 == 0 and len(ids) < len(PROMPTS):
            ids.append(engine.add_request(PROMPTS[len(ids)], params))
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        step += 1
    assert [finished[i] for i in ids] == expected
    # The shared prefix was served from cache (or, switched off, recomputed).
    assert (engine.block_manager.prefix_cache_hits > 0) == prefix_caching
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
