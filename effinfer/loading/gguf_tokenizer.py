"""A tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata, tokenizing the way llama.cpp does.

Format reference: ggml's ``docs/gguf.md`` (tokenizer keys) and llama.cpp's ``src/llama-vocab.cpp``
(the SentencePiece and BPE sessions, the pre-tokenizer regexes, the add-BOS/EOS defaults).

Idea: the vocabulary becomes a Hugging Face ``tokenizers`` backend wrapped in effinfer's
``Tokenizer``. ``llama`` (SentencePiece) vocabularies merge the adjacent pair whose result has
the highest score, which is BPE with merges ranked by that score, plus byte fallback and a ``▁``
space prefix; ``gpt2`` vocabularies are byte-level BPE with the stored merges after the
pre-tokenizer regex that ``tokenizer.ggml.pre`` names (compiled into llama.cpp, so repeated here).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from effinfer.tokenizer import Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Gemma's end of a turn: files often name no eot_token_id, and chat replies end with it, not EOS.
END_OF_TURN = "<end_of_turn>"


# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp); its engine lacks `(?i:...)`, hence the spelled-out cases.
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# tokenizer.ggml.pre -> (regex, ignore_merges, add_bos default), as llama.cpp groups them.
BPE_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"), (LLAMA3_REGEX, True, True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (QWEN2_REGEX, False, False)),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), (GPT2_REGEX, False, False)),
}


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """Build effinfer's ``Tokenizer`` from GGUF metadata (``GGUFFile.metadata``)."""
    backend, config, generation, templates = _tokenizer_parts(metadata)
    return Tokenizer(backend, tokenizer_config=config, generation_config=generation, chat_templates=templates)


def save_hf_tokenizer(metadata: dict[str, Any], directory: Path) -> None:
    """Write the GGUF tokenizer as HF files (tokenizer.json, tokenizer_config.json, generation_config.json)."""
    backend, config, generation, templates = _tokenizer_parts(metadata)
    backend.save(str(directory / "tokenizer.json"))
    config = {k: v for k, v in config.items() if v is not None}
    if "default" in templates:
        config["chat_template"] = templates["default"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _tokenizer_parts(metadata: dict[str, Any]) -> tuple[BackendTokenizer, dict, dict, dict[str, str]]:
    """(backend, tokenizer_config, generation_config, chat templates) that the GGUF metadata describes."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise TokenizerError("the GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "llama":
        add_bos_default = True
        backend = _sentencepiece_backend(tokens, metadata, types)
    elif kind == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in BPE_PRE_TOKENIZERS:
            logger.warning("GGUF pre-tokenizer %r is not known; using GPT-2's regex", pre)
        regex, ignore_merges, add_bos_default = BPE_PRE_TOKENIZERS.get(pre, (GPT2_REGEX, False, False))
        backend = _byte_level_backend(
            tokens, metadata.get("tokenizer.ggml.merges") or [], regex, ignore_merges
        )
    else:
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (llama and gpt2 are)")

    # Control tokens (BOS, chat markers) match whole and are skipped when decoding, as in llama.cpp.
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (CONTROL, UNKNOWN)
        ]
    )
    # llama.cpp always splits user-defined tokens out of the text, but prints them when decoding.
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    )

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

    config = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    }
    # End-of-turn / end-of-message tokens also end generation (llama.cpp's "end of generation" set).
    stop_ids = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if stop_ids[1] is None and END_OF_TURN in tokens:
        stop_ids.append(tokens.index(END_OF_TURN))  # as llama.cpp, which finds it by its text
    generation = {"eos_token_id": [i for i in stop_ids if isinstance(i, int) and 0 <= i < len(tokens)]}
    return backend, config, generation, _chat_templates(metadata)


def _sentencepiece_backend(tokens: list[str], metadata: dict[str, Any], types: list[int]) -> BackendTokenizer:
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    has_bytes = BYTE in types
    backend = BackendTokenizer(
        BPE(
            vocab=vocab,
            merges=_merges_by_score(tokens, scores, vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=has_bytes,
        )
    )
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp prefixes every text fragment (the text before and after each special token) with a
    # space, then writes spaces as ▁; a normalizer runs per fragment, so it does the same.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])
    )
    return backend


def _merges_by_score(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every token into two vocabulary pieces, best-scoring result first.

    SentencePiece-BPE merges the adjacent pair whose concatenation is the highest-scoring token;
    BPE with merges ranked by that score makes the same choices.
    """
    ranked = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_backend(
    tokens: list[str], merges: list[str], regex: str, ignore_merges: bool
) -> BackendTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character separates the pair
        if cut > 0:
            pairs.append((merge[:cut], merge[cut + 1 :]))
    try:
        model = BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    except Exception as exc:  # tokenizers raises plain Exception for merges outside the vocabulary
        raise TokenizerError(f"GGUF merges do not fit the vocabulary: {exc}") from exc
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _chat_templates(metadata: dict[str, Any]) -> dict[str, str]:
    templates = {}
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        templates["default"] = metadata["tokenizer.chat_template"]
    prefix = "tokenizer.chat_template."
    for key, value in metadata.items():
        if key.startswith(prefix) and isinstance(value, str):
            templates[key[len(prefix) :]] = value
    return templates
