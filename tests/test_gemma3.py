"""Gemma 3 against transformers: random-initialised ``Gemma3ForCausalLM`` models (float32, tiny, an
8-token sliding window with global layers between) must give HF's logits and HF's greedy tokens over
sequences many windows long, batched, with prefix caching on and off.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.config import ModelConfig

from .conftest import TINY, copy_tokenizer
from .test_models_vs_hf import _all_position_logits

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


def test_dense_forward_matches_hf(hf_and_path):
    hf, path = hf_and_path
    model = _llm(path).engine.runner.model
    batch = torch.tensor([BASE[:30], PROMPTS[2][-30:]])
    with torch.no_grad():
        expected = hf(batch).logits
        ours = model.compute_logits(model.forward_dense(batch)).float()
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def hf_greedy(hf_and_path) -> list[list[int]]:
    """HF generate's greedy continuation of each prompt (computed once for both cache settings)."""
    hf, _ = hf_and_path
    continuations = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            continuations.append(out[0, len(prompt) :].tolist())
    return continuations


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_hf_generate(hf_and_path, hf_greedy, prefix_caching):
    """Prompts of different lengths join the batch at different steps; the third shares the first's
    37-token prefix, which prefix caching serves from cache (blocks of 4 tokens, window 8)."""
    engine = _llm(hf_and_path[1], enable_prefix_caching=prefix_caching).engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    arrivals = {3 * i: prompt for i, prompt in enumerate(PROMPTS)}  # prompt i joins at step 3i
    request_ids, tokens = [], {}
    for step in itertools.count():
        if step in arrivals:
            request_ids.append(engine.add_request(arrivals[step], params))
        tokens.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
        if len(tokens) == len(PROMPTS):
            break
    assert [tokens[i] for i in request_ids] == hf_greedy
    # The shared prefix was served from cache (or, switched off, recomputed).
    assert (engine.block_manager.prefix_cache_hits > 0) == prefix_caching
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_transformers4_config_layout_reads_as_transformers_does():
    """A config.json in the 4.x layout (as Gemma 3 270M ships it: rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern) gives the windows and rope bases transformers derives."""
    import transformers

    hf = {
        "architectures": ["Gemma3ForCausalLM"],
        **TINY,
        "num_hidden_layers": 7,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512,
        "sliding_window_pattern": 3,
    }
    config = ModelConfig.from_hf(hf)
    reference = transformers.Gemma3TextConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    assert config.sliding_windows == [
        512 if t == "sliding_attention" else None for t in reference.layer_types
    ]
    full, local = reference.rope_parameters["full_attention"], reference.rope_parameters["sliding_attention"]
    assert (config.rope_theta, config.rope_local_theta) == (full["rope_theta"], local["rope_theta"])
    assert config.rope_scaling["rope_type"] == full["rope_type"] == "linear"
    assert config.rope_scaling["factor"] == full["factor"]
    assert config.hidden_act == reference.hidden_activation and config.tie_word_embeddings
