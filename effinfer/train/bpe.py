"""Byte-level BPE tokenizer for a model trained from scratch (Sennrich et al. 2016; GPT-2's byte-level variant).

BPE merges the most frequent adjacent pairs, starting from the 256 bytes, so any text encodes
without an unknown token. ``<|endoftext|>`` is the only special token: it separates documents in
the training stream and is the BOS and EOS of the finished model. It is saved with a
tokenizer_config.json that effinfer's ``Tokenizer`` and transformers' ``AutoTokenizer`` read alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEPARATOR = "<|endoftext|>"
# Files that make up a tokenizer directory, copied as they are from an --init model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE whose only special token, ``<|endoftext|>`` (id 0), separates documents.

    It is also the BOS token, added in front of every encoded prompt, so a prompt starts the way
    every training document does.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    separator_id = tokenizer.token_to_id(SEPARATOR)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SEPARATOR} $A",
        pair=f"{SEPARATOR} $A {SEPARATOR} $B",
        special_tokens=[(SEPARATOR, separator_id)],
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path, model_max_length: int) -> None:
    """tokenizer.json plus a tokenizer_config.json that effinfer and transformers read the same way."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SEPARATOR,
        "eos_token": SEPARATOR,
        "unk_token": None,
        # Matches the post-processor: both loaders then add exactly one BOS and no EOS.
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tokenizer: Tokenizer, texts: list[str], separator_id: int) -> np.ndarray:
    """One stream: ``<sep> doc0 <sep> doc1 ...``, as uint16 when the vocabulary fits."""
    # Text that happens to contain "<|endoftext|>" must not become a document boundary.
    tokenizer.encode_special_tokens = True
    try:
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = False
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    pieces = []
    for encoding in encodings:
        pieces.append(np.array([separator_id], dtype=dtype))
        pieces.append(np.asarray(encoding.ids, dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
