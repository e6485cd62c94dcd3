"""Bad input gets a clear error that names the problem, from the API and from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from effinfer import LLM, ConfigError, InvalidSamplingParams, PromptError, SamplingParams
from effinfer.cli import main as cli_main


@pytest.fixture(scope="module")
def llm(stories260k):
    return LLM(str(stories260k), show_progress=False)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="does not exist") as info:
        LLM(str(missing))
    assert str(missing) in str(info.value)


def test_directory_without_config_or_weights(tmp_path, stories260k):
    with pytest.raises(ConfigError, match="config.json"):
        LLM(str(tmp_path))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k / name, tmp_path / name)
    with pytest.raises(ConfigError, match=r"no \*\.safetensors"):
        LLM(str(tmp_path))


def test_unsupported_architecture_lists_supported_ones(tmp_path, stories260k):
    shutil.copytree(stories260k, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="GPTNeoXForCausalLM") as info:
        LLM(str(tmp_path / "m"))
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in str(info.value)


def test_prompt_longer_than_context(llm):
    too_long = [1] + [300] * llm.engine.max_model_len
    with pytest.raises(PromptError, match="context"):
        llm.generate([too_long], SamplingParams(max_tokens=4))
    with pytest.raises(PromptError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=4))
    with pytest.raises(PromptError, match="token ids"):
        llm.generate([[1, 10**6]], SamplingParams(max_tokens=4))
    # A failed batch leaves nothing behind: the engine still serves and every block is free.
    with pytest.raises(PromptError):
        llm.generate([[1, 5, 6], too_long], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([[1, 5, 6]], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"temperature": float("nan")}, "temperature"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_invalid_sampling_values(kwargs, field):
    with pytest.raises(InvalidSamplingParams, match=field):
        SamplingParams(**kwargs)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effinfer: error:") and "does not exist" in err and "Traceback" not in err


def test_cli_generate_streams_text(stories260k):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "effinfer.cli",
            "generate",
            "--model",
            str(stories260k),
            "--temperature",
            "0",
            "--max-tokens",
            "20",
            "Once upon a time",
        ],
        capture_output=True,
        text=True,
        timeout=600,  # seconds on an idle machine; CI machines can be loaded
    )
    assert result.returncode == 0, result.stderr
    llm = LLM(str(stories260k), show_progress=False)
    expected = (
        llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].text
    )
    assert result.stdout == "Once upon a time" + expected + "\n"


def test_cli_chat_session(stories260k, tmp_path):
    """The interactive chat reads turns from stdin, uses the fallback template for a model without one."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "effinfer.cli",
            "chat",
            "--model",
            str(stories260k),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
        input="Tell me a story\n/reset\nOnce upon a time\n/exit\n",
        capture_output=True,
        text=True,
        timeout=600,  # seconds on an idle machine; CI machines can be loaded
    )
    assert result.returncode == 0, result.stderr
    assert "no chat template" in result.stderr
    assert result.stdout.count("> ") >= 3  # three prompts were shown
    replies = [line for line in result.stdout.split("> ") if line.strip()]
    assert len(replies) >= 2 and all(r.strip() for r in replies[:2])
