"""The built-in default model: shipped in the package, used when no model is given, writes Python."""

from __future__ import annotations

import io
import subprocess
import sys
import tokenize

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.default_model import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), reason="the default model is not installed"
)


@pytest.fixture(scope="module")
def llm():
    return LLM(show_progress=False)


def test_small_enough_to_ship():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20


def test_transformers_gives_the_same_logits():
    from transformers import AutoModelForCausalLM

    ours = LLM(str(DEFAULT_MODEL_DIR), dtype="float32", show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    ids = ours.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
        model = ours.engine.model
        got = model.compute_logits(model.forward_dense(torch.tensor([ids])))[0]
    # float32 on both sides: a few ulps of logits up to ~15 (measured 2e-5), as test_models_vs_hf allows.
    assert (got - expected).abs().max().item() < 1e-4


def test_writes_python_like_code(llm):
    prompt = "def fibonacci(n):\n"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=60))[0].outputs[0].text
    lines = [line for line in out.splitlines() if line.strip()]
    # The body is indented and uses Python keywords; a model that had not learned code would not.
    assert sum(line.startswith("    ") for line in lines) >= 2
    assert any(word in out for word in ("return", "if ", "for ", "while ", "self", "=")), out
    # Python's own tokenizer reads it as Python (the text may be cut off mid-string at the end).
    names = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(prompt + out).readline):
            names += token.type == tokenize.NAME
    except tokenize.TokenError:
        pass
    assert names >= 10


def test_cli_without_model_uses_the_default():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "effinfer.cli",
            "generate",
            "--temperature",
            "0",
            "--max-tokens",
            "20",
            "--ignore-eos",
            "--dtype",
            "float32",
            "import os\n",
        ],
        capture_output=True,
        text=True,
        timeout=600,  # seconds on an idle machine; CI machines can be loaded
    )
    assert result.returncode == 0, result.stderr
    # The CLI echoes the prompt; the 20 tokens after it must be transformers' greedy continuation.
    from transformers import AutoModelForCausalLM

    ours = LLM(str(DEFAULT_MODEL_DIR), dtype="float32", show_progress=False)
    ids = ours.tokenizer.encode("import os\n")
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    expected = greedy[0, len(ids) :].tolist()
    out = ours.generate([ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == expected
    assert result.stdout == "import os\n" + out.text + "\n"
