"""Sliding-window perplexity against the same procedure computed with transformers."""

from __future__ import annotations

import math
import re

import pytest
import torch

from effinfer import LLM
from effinfer.cli import main as cli_main
from effinfer.eval import perplexity

# Two float32 implementations give logits a few ulps apart (ulp(20) ~ 2e-6; test_models_vs_hf holds them
# to 1e-4, stories260K's differ by ~2e-5). A token's NLL, logsumexp(z) - z_target, moves by at most twice
# the largest logit change, so the mean NLL, the log of the perplexity, differs by at most ~4e-5: a
# relative 1e-4 on the perplexity. A wrong window, shift or scored-token mask moves it by percents.
FLOAT32_PPL_RTOL = 1e-4
CLI_RESULT = re.compile(
    r"perplexity (?P<ppl>[\d.]+) \((?P<nll>[\d.]+) nats/token\) over (?P<tokens>\d+) tokens in (?P<windows>\d+) windows"
)


def hf_sliding_window_ppl(
    model, ids: list[int], ctx: int, stride: int, max_windows: int | None
) -> tuple[float, int]:
    """HF's guide ("Perplexity of fixed-length models"): the perplexity and the number of scored tokens."""
    ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for i, begin in enumerate(range(0, ids.shape[1], stride)):
        if max_windows is not None and i >= max_windows:
            break
        end = min(begin + ctx, ids.shape[1])
        trg_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(window).logits.float()
        losses = torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"
        )
        nll_sum += losses.item()
        n_tokens += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("ctx, stride", [(128, 128), (128, 64)])
def test_perplexity_matches_transformers(stories260k, shared_data, ctx, stride):
    from transformers import AutoModelForCausalLM

    text = (shared_data / "text" / "tinystories_valid.txt").read_text()[:6000]
    llm = LLM(str(stories260k), dtype="float32", show_progress=False)
    ours = perplexity(llm, text=text, ctx=ctx, stride=stride, show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    ids = llm.tokenizer.encode(text)
    expected, expected_tokens = hf_sliding_window_ppl(hf, ids, ctx, stride, None)
    assert ours.perplexity == pytest.approx(expected, rel=FLOAT32_PPL_RTOL)
    # Overlapping windows score every token after the first; disjoint ones also skip each window's first
    # token, which has no context.
    rule_count = len(ids) - 1 if stride < ctx else len(ids) - math.ceil(len(ids) / ctx)
    assert ours.num_tokens == expected_tokens == rule_count
    # A trained model: far better than uniform over its 512 tokens, as the data README reports (~1.3-1.5 nats).
    assert 0.8 < ours.nll_per_token < 2.5


def test_eval_ppl_cli(stories260k, shared_data, capsys):
    """The printed perplexity, NLL and token count are transformers' on the same three windows."""
    from transformers import AutoModelForCausalLM

    data = shared_data / "text" / "tinystories_valid.txt"
    code = cli_main(
        [
            "eval",
            "ppl",
            "--model",
            str(stories260k),
            "--data",
            str(data),
            "--ctx",
            "256",
            "--max-windows",
            "3",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    printed = CLI_RESULT.search(capsys.readouterr().out)
    assert printed, "eval ppl printed no result line"
    hf = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32)
    ids = LLM(str(stories260k), show_progress=False).tokenizer.encode(data.read_text())
    expected, expected_tokens = hf_sliding_window_ppl(hf, ids, 256, 256, 3)
    assert int(printed["windows"]) == 3
    assert int(printed["tokens"]) == expected_tokens == 3 * 255
    # Printed with 4 decimals: allow half a unit in the last place on top of float32's difference.
    assert float(printed["ppl"]) == pytest.approx(expected, rel=FLOAT32_PPL_RTOL, abs=5e-5)
    assert float(printed["nll"]) == pytest.approx(math.log(expected), abs=FLOAT32_PPL_RTOL + 5e-5)


def test_eval_ppl_missing_file(stories260k, tmp_path, capsys):
    code = cli_main(["eval", "ppl", "--model", str(stories260k), "--data", str(tmp_path / "nope.txt")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_paged_perplexity_equals_dense_scoring(stories260k, shared_data):
    """Scoring token by token through the paged KV cache gives the dense (cache-free) perplexity."""
    from effinfer.eval.perplexity import paged_perplexity

    text = (shared_data / "text" / "tinystories_valid.txt").read_text()[:3000]
    llm = LLM(str(stories260k), dtype="float32", show_progress=False)
    dense = perplexity(llm, text=text, ctx=128, max_windows=2, show_progress=False)
    for chunk in (1, 7):
        paged = paged_perplexity(llm, text=text, ctx=128, max_windows=2, chunk=chunk, show_progress=False)
        assert paged.num_tokens == dense.num_tokens
        assert paged.perplexity == pytest.approx(dense.perplexity, rel=1e-5)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_paged_perplexity_leaves_nothing_in_the_prefix_cache(stories260k, shared_data):
    """Scoring never computes the KV of a window's last token, so its blocks must not be reused later."""
    from effinfer import SamplingParams
    from effinfer.eval.perplexity import paged_perplexity

    text = (shared_data / "text" / "tinystories_valid.txt").read_text()[:3000]
    llm = LLM(str(stories260k), dtype="float32", block_size=16, show_progress=False)
    window = llm.tokenizer.encode(text)[:128]  # a whole number of blocks
    paged_perplexity(llm, token_ids=window, ctx=128, max_windows=1, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    prompt = window + window[1:9]
    after_scoring = llm.generate([prompt], params)[0]
    assert after_scoring.num_cached_tokens == 0
    fresh = LLM(str(stories260k), dtype="float32", enable_prefix_caching=False, show_progress=False)
    expected = fresh.generate([prompt], params)[0].outputs[0]
    assert after_scoring.outputs[0].token_ids == expected.token_ids
    for got, want in zip(after_scoring.outputs[0].logprobs, expected.logprobs):
        assert {t: p.logprob for t, p in got.items()} == pytest.approx(
            {t: p.logprob for t, p in want.items()}
        )
