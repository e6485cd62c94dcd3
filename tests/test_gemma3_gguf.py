"""Opt-in: the real Gemma 3 270M (Q4_K_M GGUF, fetched by ../shared/data/fetch_models.sh into
$EFFINFER_MODELS or ~/.cache/effinfer-models) against llama.cpp (llama-cpp-python) on the same file;
skipped when the file or llama-cpp-python is absent.

Tokenizer ids equal llama.cpp's on varied text; llama.cpp's greedy continuations, scored by
effinfer in one causal pass, get effinfer's greedy next token at >= 90% of positions (one prompt
longer than the 512-token window, so the local layers really slide); the engine's own greedy
continuations, scored by llama.cpp, agree as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.loading.gguf import GGUFFile

from .conftest import shared_data_dir

llama_cpp = pytest.importorskip("llama_cpp")

MODEL = (
    Path(os.environ.get("EFFINFER_MODELS", Path.home() / ".cache" / "effinfer-models"))
    / "gemma-3-270m-q4_k_m.gguf"
)
pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} not fetched (fetch_models.sh)")

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "def f(x):\n    return x**2  # square\n\n\n\tindented\ttabs",
    "1234567890 3.14159 1,000,000 0x1F 1e-9",
    "naïve café résumé Ünïcödé Ελληνικά русский",
    "日本語のテキストと中文文本，한국어도",
    "emoji 🎉🚀👍🏽 and 🤖",
    "runs:     five spaces,\n\n\n\nfour newlines, \u00a0nbsp",
    "<table><tr><td>html</td></tr></table>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "日本の首都は"]
NEW_TOKENS = 24
WINDOW = 512


def _llama(n_ctx: int, logits_all: bool = False):
    return llama_cpp.Llama(
        model_path=str(MODEL),
        n_ctx=n_ctx,
        n_batch=64,  # llama-cpp-python keeps n_batch (or n_ctx) rows of 262k logits
        n_threads=2,
        seed=0,
        logits_all=logits_all,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(MODEL), dtype="float32", kv_cache_memory=64 << 20, max_model_len=1024, show_progress=False)


def test_tokenizer_matches_llama_cpp():
    tokenizer = GGUFFile(MODEL).tokenizer()
    vocab = llama_cpp.Llama(model_path=str(MODEL), vocab_only=True, verbose=False)
    for text in TEXTS:
        expected = vocab.tokenize(text.encode(), add_bos=True, special=True)
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.decode(expected) == vocab.detokenize(expected[1:]).decode()


def test_chat_template_and_turn_end():
    """The file has no chat template: Gemma's turn format is used, and <end_of_turn> ends generation."""
    tokenizer = GGUFFile(MODEL).tokenizer()
    assert tokenizer.token_to_id("<end_of_turn>") in tokenizer.eos_token_ids
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template([*messages, {"role": "user", "content": "Bye"}])
    assert text == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    data = shared_data_dir()
    gemma2 = data / "chat_templates" / "google-gemma-2-2b-it.jinja" if data else None
    if gemma2 and gemma2.is_file():  # Gemma 2 published the same turn format
        tokenizer.chat_template = gemma2.read_text()
        assert tokenizer.apply_chat_template([*messages, {"role": "user", "content": "Bye"}]) == text
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tokenizer.chat_template = tokenizer.chat_templates["default"]
    assert tokenizer.apply_chat_template(system, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
    )


def _long_prompt(tokenizer) -> str:
    data = shared_data_dir()
    story = data / "text" / "tinystories_valid.txt" if data else None
    if not (story and story.is_file()):
        pytest.skip("../shared/data/text is not present")
    text = story.read_text()[:4000]
    assert len(tokenizer.encode(text)) > WINDOW + 64
    return text


def test_teacher_forced_agreement_with_llama_cpp(llm):
    """llama.cpp generates greedily; effinfer scores each sequence in one causal pass (no cache)."""
    model, tokenizer = llm.engine.runner.model, llm.engine.tokenizer
    reference = _llama(n_ctx=1024)
    agree = total = 0
    for prompt in [*PROMPTS, _long_prompt(tokenizer)]:
        prompt_ids = reference.tokenize(prompt.encode(), add_bos=True, special=False)
        assert tokenizer.encode(prompt) == prompt_ids
        generated = []
        for token in reference.generate(
            prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0
        ):
            generated.append(token)
            if len(generated) == NEW_TOKENS or token in tokenizer.eos_token_ids:
                break
        with torch.no_grad():
            hidden = model.forward_dense(torch.tensor([prompt_ids + generated[:-1]]))
            ours = model.compute_logits(hidden)[0, len(prompt_ids) - 1 :].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(ours, generated))
        total += len(generated)
    assert agree / total >= 0.90, (agree, total)


def test_engine_generation_agrees_with_llama_cpp(llm):
    """The engine's greedy continuations (paged KV, decode steps), scored by llama.cpp teacher-forced."""
    tokenizer = llm.engine.tokenizer
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    reference = _llama(n_ctx=64, logits_all=True)
    agree = total = 0
    for prompt, output in zip(PROMPTS, outputs):
        print(f"{prompt!r} -> {output.outputs[0].text!r}")
        prompt_ids, generated = tokenizer.encode(prompt), list(output.outputs[0].token_ids)
        reference.reset()
        reference.eval(prompt_ids + generated[:-1])
        expected = reference.scores[len(prompt_ids) - 1 : len(prompt_ids) + len(generated) - 1].argmax(-1)
        agree += sum(int(a) == b for a, b in zip(expected, generated))
        total += len(generated)
    assert agree / total >= 0.90, (agree, total)
