"""Tokenizers built from GGUF metadata against llama.cpp's own test vectors.

``ggml-vocab-*.gguf`` are llama.cpp's vocabulary-only files; ``.inp`` holds inputs separated by
``\\n__ggml_vocab_test__\\n`` and each ``.out`` line the ids llama.cpp's ``test-tokenizer-0`` expects,
produced with ``add_special=false`` and ``parse_special=false`` (no BOS, specials as plain text).
"""

from __future__ import annotations

import pytest

from effinfer.loading.gguf import GGUFFile
from effinfer.tokenizer import TokenizerError

VOCABS = ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3"]


@pytest.fixture(scope="module")
def vocab_dir(shared_data):
    path = shared_data / "tokenizers"
    if not (path / "ggml-vocab-llama-spm.gguf").is_file():
        pytest.skip("llama.cpp vocabulary files are not present")
    return path


_cache: dict = {}


def _tokenizer(vocab_dir, name):
    if name not in _cache:
        _cache[name] = GGUFFile(vocab_dir / f"ggml-vocab-{name}.gguf").tokenizer()
    return _cache[name]


def _vectors(vocab_dir, name) -> list[tuple[str, list[int]]]:
    raw = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    if inputs and inputs[-1] == "":  # the file ends with a separator, as llama.cpp's reader expects
        inputs.pop()
    outputs = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs)
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, outputs)]


@pytest.mark.parametrize("name", VOCABS)
def test_matches_llama_cpp_vectors(vocab_dir, name):
    tokenizer = _tokenizer(vocab_dir, name)
    failures = []
    for text, expected in _vectors(vocab_dir, name):
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != expected:
            failures.append((text, expected, got))
    assert not failures, f"{len(failures)} mismatches, first: {failures[0]}"


@pytest.mark.parametrize("name", VOCABS)
def test_decode_inverts_encode(vocab_dir, name):
    tokenizer = _tokenizer(vocab_dir, name)
    for text, _ in _vectors(vocab_dir, name):
        if "\ufffd" in text:
            continue  # invalid UTF-8 in the input file does not round-trip
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = tokenizer.decode(ids)
        # SentencePiece vocabularies add a space prefix that decoding strips once.
        assert decoded == text or decoded == text.lstrip(" ") or decoded.lstrip(" ") == text.lstrip(" ")


def test_special_tokens_and_bos_flags(vocab_dir):
    spm = _tokenizer(vocab_dir, "llama-spm")
    assert (spm.bos_token, spm.eos_token, spm.bos_token_id, spm.eos_token_ids) == ("<s>", "</s>", 1, [2])
    assert spm.encode("Hello")[0] == 1  # tokenizer.ggml.add_bos_token
    assert spm.decode(spm.encode("Hello world")) == "Hello world"

    llama3 = _tokenizer(vocab_dir, "llama-bpe")
    assert llama3.encode("Hello")[0] == 128000  # llama-bpe adds BOS by default in llama.cpp
    assert llama3.encode("<|begin_of_text|>Hi", add_special_tokens=False)[0] == 128000
    assert llama3.is_special(128001)

    qwen = _tokenizer(vocab_dir, "qwen2")
    assert qwen.encode("Hello") == qwen.encode("Hello", add_special_tokens=False)  # qwen2 adds no BOS
    assert qwen.eos_token_ids == [151643]


def test_chat_template_from_metadata(vocab_dir):
    qwen = _tokenizer(vocab_dir, "qwen2")
    prompt = qwen.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = qwen.encode(prompt, add_special_tokens=False)
    assert ids[:1] == [qwen.token_to_id("<|im_start|>")] and qwen.is_special(ids[0])


def test_unsupported_tokenizer_model():
    from effinfer.loading.gguf_tokenizer import tokenizer_from_gguf

    with pytest.raises(TokenizerError, match="not supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="no vocabulary"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"})
