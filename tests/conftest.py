"""Shared fixtures: the reference data in ../shared/data and tiny HF models built with transformers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from effinfer.kernels.cpu.build import KernelBuildError

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_kernel_missing(extension: Callable[[], Any]) -> bool:
    """Whether the tests of a C++ CPU kernel should skip: it legitimately cannot run here.

    Under EFFINFER_REQUIRE_KERNELS=1 a kernel that failed to build on a CPU able to run it is not
    missing: its tests run and each fails with the build error (a skip would keep CI green).
    """
    try:
        return extension() is None
    except KernelBuildError:
        return False


def shared_data_dir() -> Path | None:
    candidates = [os.environ.get("EFFINFER_SHARED_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture(scope="session")
def stories260k(shared_data) -> Path:
    path = shared_data / "stories260K" / "hf"
    if not (path / "model.safetensors").is_file():
        pytest.skip("stories260K/hf is not present")
    return path


TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_hf_model(arch: str, directory: Path, seed: int = 0, **overrides):
    """Random-init a small HF model of the given architecture, save it with a tokenizer, return (model, path)."""
    import transformers

    config_cls = getattr(transformers, arch).config_class
    kwargs = {**TINY, **overrides}
    if arch == "Qwen3ForCausalLM":
        kwargs.setdefault("head_dim", 16)
    kwargs.setdefault("bos_token_id", 1)
    kwargs.setdefault("eos_token_id", 2)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    # Default init gives near-uniform logits; a larger spread makes greedy decoding decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.08 if p.dim() > 1 else 0.02)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    return model, directory


def copy_tokenizer(directory: Path) -> None:
    """Give a test model the stories260K tokenizer (512 tokens) if available, else a tiny byte-level one."""
    data = shared_data_dir()
    source = data / "stories260K" / "hf" if data else None
    if source and (source / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).write_bytes((source / name).read_bytes())
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
