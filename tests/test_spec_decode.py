"""Speculative decoding: greedy output is token-identical to plain decoding (prompt lookup and a
draft model, in continuous batches), and sampling is lossless (chi-square tests that also reject
a deliberately broken acceptance rule)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from effinfer import LLM, ConfigError, SamplingParams
from effinfer.spec import verify
from tests.conftest import make_hf_model

# Texts that repeat themselves, so prompt lookup has something to find, of different lengths.
PROMPTS = [
    "Once upon a time, there was a little dog named Max. Max liked to play with his ball. One day, Max",
    "Tom and Sue went to the park.",
    "One day, a cat found a red ball under the bed. The cat liked the red ball. The cat",
    "Lily was happy. Lily was happy. Lily was happy. Lily",
]
GREEDY = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)


def _tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def plain(stories260k):
    return LLM(str(stories260k), show_progress=False)


@pytest.fixture(scope="module")
def llama2xs(shared_data, tmp_path_factory) -> Path:
    source = shared_data / "llama2xs" / "model.bin"
    if not source.is_file():
        pytest.skip("llama2xs is not present")
    return llama2c_to_hf(source, shared_data / "stories260K" / "hf", tmp_path_factory.mktemp("llama2xs"))


def llama2c_to_hf(bin_path: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Write a llama2.c legacy checkpoint (7 int32 header, float32 weights) as an HF Llama directory."""
    raw = bin_path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared_classifier, vocab = vocab > 0, abs(vocab)
    data = torch.from_numpy(np.frombuffer(raw, dtype=np.float32, offset=28).copy())
    head_dim = dim // heads
    offset = 0

    def take(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        offset += n
        return data[offset - n : offset].view(*shape)

    def halves(w, n):  # llama2.c rotates interleaved pairs; HF rotates the two halves of each head
        return w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    embed, attn_norm = take(vocab, dim), take(layers, dim)
    wq, wk = take(layers, dim, dim), take(layers, kv_heads * head_dim, dim)
    wv, wo = take(layers, kv_heads * head_dim, dim), take(layers, dim, dim)
    ffn_norm, w1, w2, w3 = (
        take(layers, dim),
        take(layers, hidden, dim),
        take(layers, dim, hidden),
        take(layers, hidden, dim),
    )
    final_norm = take(dim)
    take(2, seq_len, head_dim // 2)  # rotary tables, recomputed by the loader
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": final_norm}
    if not shared_classifier:
        tensors["lm_head.weight"] = take(vocab, dim)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": attn_norm[i], p + "post_attention_layernorm.weight": ffn_norm[i],
            p + "self_attn.q_proj.weight": halves(wq[i], heads), p + "self_attn.k_proj.weight": halves(wk[i], kv_heads),
            p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
            p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i], p + "mlp.up_proj.weight": w3[i],
        })  # fmt: skip
    assert offset == data.numel(), "the file holds more or fewer weights than its header says"
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=dim,
        intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
        rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=shared_classifier,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


def test_llama2c_conversion_reproduces_the_published_hf_weights(shared_data, tmp_path):
    from safetensors.torch import load_file

    hf = shared_data / "stories260K" / "hf"
    converted = llama2c_to_hf(shared_data / "stories260K" / "llama2c" / "stories260K.bin", hf, tmp_path)
    ours, theirs = load_file(converted / "model.safetensors"), load_file(hf / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_greedy_speculation_is_token_identical(stories260k, plain, llama2xs, proposer):
    prompts = PROMPTS + [PROMPTS[0]]
    params = [GREEDY] * len(PROMPTS) + [SamplingParams(temperature=0, max_tokens=37, n=2, ignore_eos=True)]
    reference = _tokens(plain.generate(prompts, params))
    model = "ngram" if proposer == "ngram" else str(llama2xs)
    llm = LLM(
        str(stories260k), speculative_model=model, num_speculative_tokens=4, speculative_adaptive=False,
        show_progress=False,
    )  # fmt: skip
    assert _tokens(llm.generate(prompts, params)) == reference
    stats = llm.engine.stats()
    assert stats.num_accepted_tokens > 0 and stats.spec_mean_accepted_length > 1
    assert stats.num_used_blocks == 0
    # max_tokens that lands inside an accepted run still stops exactly there.
    assert [len(t) for r in _tokens(llm.generate(prompts, params)) for t in r] == [50] * 4 + [37, 37]


def test_speculation_with_chunked_prefill_stop_strings_and_streaming(stories260k, plain):
    reference = plain.generate(PROMPTS, GREEDY)
    stop = reference[0].outputs[0].text[20:26]
    stopped = SamplingParams(temperature=0, max_tokens=50, stop=[stop], ignore_eos=True)
    llm = LLM(
        str(stories260k), speculative_model="ngram", num_speculative_tokens=3, speculative_adaptive=False,
        enable_chunked_prefill=True, max_num_batched_tokens=16, show_progress=False,
    )  # fmt: skip
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == _tokens(reference)
    expected = plain.generate(PROMPTS[0], stopped)[0].outputs[0]
    got = llm.generate(PROMPTS[0], stopped)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, "stop")
    with_logprobs = SamplingParams(temperature=0, max_tokens=30, logprobs=2, ignore_eos=True)
    expected = plain.generate(PROMPTS[2], with_logprobs)[0].outputs[0].logprobs
    got = llm.generate(PROMPTS[2], with_logprobs)[0].outputs[0].logprobs
    assert [set(step) for step in got] == [set(step) for step in expected]
    for got_step, expected_step in zip(got, expected):
        for token_id, logprob in expected_step.items():
            assert got_step[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)
    deltas = [o.outputs[0].delta_token_ids for o in llm.stream(PROMPTS[3], GREEDY)]
    assert sum(deltas, []) == reference[3].outputs[0].token_ids
    assert max(len(d) for d in deltas) > 1  # several tokens in one streamed update


def test_draft_model_survives_preemption(stories260k, plain, llama2xs):
    from effinfer.engine.runner import kv_bytes_per_block

    reference = _tokens(plain.generate(PROMPTS * 2, GREEDY))
    per_block = kv_bytes_per_block(plain.engine.model_config, 16, plain.engine.dtype)
    llm = LLM(
        str(stories260k),
        speculative_model=str(llama2xs),
        speculative_adaptive=False,
        kv_cache_memory=12 * per_block,
        show_progress=False,
    )
    assert _tokens(llm.generate(PROMPTS * 2, GREEDY)) == reference
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.num_accepted_tokens > 0 and stats.num_used_blocks == 0


def test_draft_with_another_vocabulary_is_refused(stories260k, tmp_path):
    _, draft = make_hf_model("LlamaForCausalLM", tmp_path / "draft", vocab_size=640)
    with pytest.raises(ConfigError, match="vocabulary of 640 tokens"):
        LLM(str(stories260k), speculative_model=str(draft), show_progress=False)


# ---- lossless sampling ------------------------------------------------------------------------


def _chi_square_p_value(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Two-sample chi-square test of homogeneity; categories with a small pooled count are merged."""
    pooled = counts_a + counts_b
    small = pooled < 10
    table = torch.stack([counts_a, counts_b]).double()
    if small.any():
        table = torch.cat([table[:, ~small], table[:, small].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2))


def _broken_accept(target_probs, draft_token_ids, generator=None):
    """A wrong rule: on rejection, the correction is drawn from p instead of the residual p - q."""
    k = len(draft_token_ids)
    for i, d in enumerate(draft_token_ids):
        if torch.rand((), generator=generator) >= target_probs[i, d]:
            return draft_token_ids[:i] + [torch.multinomial(target_probs[i], 1, generator=generator).item()]
    return draft_token_ids + [torch.multinomial(target_probs[k], 1, generator=generator).item()]


@pytest.mark.parametrize("rule", ["correct", "broken"])
def test_acceptance_rule_gives_the_target_distribution(rule):
    """First emitted token ~ p_1, and the second ~ p_2 whenever the first draft was accepted."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vocab, num_samples = 6, 20000
    probs = torch.distributions.Dirichlet(torch.ones(vocab)).sample((3,))
    drafts = [int(probs[0].argmax()), 2]
    accept = verify.accept_drafts if rule == "correct" else _broken_accept
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(num_samples):
        tokens = accept(probs, drafts, gen)
        first[tokens[0]] += 1
        if len(tokens) > 1 and tokens[0] == drafts[0]:
            second[tokens[1]] += 1
    direct = torch.multinomial(probs[0], num_samples, replacement=True, generator=gen).bincount(
        minlength=vocab
    )
    direct2 = torch.multinomial(probs[1], int(second.sum()), replacement=True, generator=gen).bincount(
        minlength=vocab
    )
    p_first, p_second = (
        _chi_square_p_value(first, direct.float()),
        _chi_square_p_value(second, direct2.float()),
    )
    if rule == "correct":
        assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)
    else:
        assert min(p_first, p_second) < 1e-6, (p_first, p_second)


def test_draws_follow_the_weights_and_never_pick_a_zero_weight_token():
    """The inverse-CDF draw behind every emitted token: zero weights (the residual's removed draft,
    a filtered-out tail) are never drawn, and the others come at their share (unnormalised weights)."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 0.6, 0.0, 0.0, 1.4, 0.0])
    draws = [verify.draw_token(weights, gen) for _ in range(5000)]
    assert set(draws) == {1, 4}
    assert draws.count(4) / len(draws) == pytest.approx(0.7, abs=0.03)


@pytest.mark.parametrize("rule", ["correct", "broken"])
def test_sampling_with_speculation_matches_plain_sampling(stories260k, plain, monkeypatch, rule):
    """Next four tokens of a repetitive prompt at temperature 1 with top-k, drawn many times with
    and without prompt-lookup speculation: their distributions must not differ. The first token
    comes from the prefill; then prompt lookup proposes "cat was", and " was" has a target
    probability near 1/4 there, so a wrong rule shows in the third token."""
    if rule == "broken":
        monkeypatch.setattr("effinfer.spec.speculator.accept_drafts", _broken_accept)
    num_samples, num_tokens = 1500, 4
    prompt = "The cat was happy. The"
    llm = LLM(
        str(stories260k),
        speculative_model="ngram",
        num_speculative_tokens=3,
        speculative_adaptive=False,  # in a batch of 256 adaptation would draft nothing to test
        max_num_seqs=256,
        show_progress=False,
    )
    counts = []
    for engine_llm, seed0 in ((plain, 0), (llm, 10**6)):
        params = [
            SamplingParams(temperature=1.0, top_k=50, max_tokens=num_tokens, ignore_eos=True, seed=seed0 + i)
            for i in range(num_samples)
        ]
        outputs = engine_llm.generate([prompt] * num_samples, params)
        tokens = torch.tensor([o.outputs[0].token_ids for o in outputs])
        counts.append([tokens[:, j].bincount(minlength=512).float() for j in range(num_tokens)])
    assert llm.engine.stats().num_accepted_tokens > 0
    p_values = [_chi_square_p_value(a, b) for a, b in zip(*counts)]
    if rule == "correct":
        assert min(p_values) > 1e-3, p_values
    else:
        assert min(p_values) < 1e-6, p_values
