"""Parity with llama.cpp (through llama-cpp-python) on the same GGUF files.

llama.cpp (F32 KV cache) generates greedy continuations of a few prompts; effinfer then scores
every prefix of those sequences in one causal pass and its greedy next token is compared with
llama.cpp's at every generated position. Files: stories260K.gguf (F32), its Q8_0 and Q4_0
versions made by llama.cpp's own quantizer, stories260K and the default model converted by
``effinfer convert``. Skips without llama-cpp-python.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from effinfer.loading.gguf import GGUFFile, load_model

llama_cpp = pytest.importorskip("llama_cpp")

STORY_PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park. They",
    "The little dog was sad because",
    "One day, a big bird",
    "Tom had a red ball.",
]
# The default model is trained on Python source.
CODE_PROMPTS = [
    "import os\n",
    "def main():\n",
    "class Config:\n    def __init__(self",
    "for i in range(10):\n",
    "    return",
]
NEW_TOKENS = 40


def _llama(path: Path):
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_threads=2,
        seed=0,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


def _llama_cpp_greedy(llm, prompt_ids: list[int]) -> list[int]:
    generated: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        generated.append(token)
        if token == llm.token_eos() or len(generated) == NEW_TOKENS:
            break
    return generated


def greedy_agreement(path: Path, prompts: list[str] = STORY_PROMPTS) -> float:
    """Share of generated positions where effinfer's greedy next token equals llama.cpp's."""
    checkpoint = GGUFFile(path)
    config = checkpoint.model_config()
    model = load_model(checkpoint, config, torch.float32, torch.device("cpu"), 256, show_progress=False)
    tokenizer = checkpoint.tokenizer()
    llm = _llama(path)
    agree = total = 0
    for prompt in prompts:
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        assert tokenizer.encode(prompt) == prompt_ids, prompt
        generated = _llama_cpp_greedy(llm, prompt_ids)
        sequence = prompt_ids + generated
        with torch.no_grad():
            hidden = model.forward_dense(torch.tensor([sequence[:-1]]))
            ours = model.compute_logits(hidden)[0, len(prompt_ids) - 1 :].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(ours, generated))
        total += len(generated)
    return agree / total


def _quantize(source: Path, target: Path, ftype: int) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    assert status == 0, f"llama_model_quantize failed with {status}"
    return target


@pytest.fixture(scope="module")
def stories_gguf(shared_data) -> Path:
    path = shared_data / "stories260K" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip("stories260K.gguf is not present")
    return path


def test_stories260k_f32(stories_gguf):
    assert greedy_agreement(stories_gguf) >= 0.99


@pytest.mark.parametrize("ftype", ["MOSTLY_Q8_0", "MOSTLY_Q4_0"])
def test_stories260k_quantized_by_llama_cpp(stories_gguf, tmp_path, ftype):
    path = _quantize(
        stories_gguf, tmp_path / f"stories-{ftype}.gguf", getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    )
    stored = {t.qtype.name for t in GGUFFile(path).tensors.values()}
    assert ftype.removeprefix("MOSTLY_") in stored
    assert greedy_agreement(path) >= 0.90


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_effinfer_converted_stories260k_runs_in_llama_cpp(stories260k, tmp_path, outtype):
    from effinfer.convert import convert_to_gguf

    path = convert_to_gguf(stories260k, tmp_path / f"stories-{outtype}.gguf", outtype)
    assert greedy_agreement(path) >= (0.99 if outtype == "f16" else 0.90)


@pytest.fixture(scope="module")
def default_model_dir() -> Path:
    from effinfer.default_model import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the default model is not present")
    return DEFAULT_MODEL_DIR


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_default_model_converted(default_model_dir, tmp_path, outtype):
    from effinfer.convert import convert_to_gguf

    path = convert_to_gguf(default_model_dir, tmp_path / f"default-{outtype}.gguf", outtype)
    assert greedy_agreement(path, CODE_PROMPTS) >= (0.99 if outtype == "f16" else 0.90)


@pytest.fixture(scope="module")
def default_model_f32(default_model_dir, tmp_path_factory) -> Path:
    from effinfer.convert import convert_to_gguf

    return convert_to_gguf(default_model_dir, tmp_path_factory.mktemp("gguf") / "default-f32.gguf", "f32")


# The default model's 256-wide rows take k-quants (its 704-wide ffn_down falls back to Q5_0/Q5_1/Q8_0),
# so llama.cpp's quantizer puts every supported block type into one of these files.
@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_1", "Q5_1"])
def test_default_model_quantized_by_llama_cpp(default_model_f32, tmp_path, ftype):
    path = _quantize(
        default_model_f32, tmp_path / f"{ftype}.gguf", getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    )
    assert ftype[:4] in {t.qtype.name for t in GGUFFile(path).tensors.values()}
    assert greedy_agreement(path, CODE_PROMPTS) >= 0.90
