"""``effinfer bench gguf``: argument errors and llama-bench's report, without llama.cpp being built.

The llama-bench stand-in prints rows in llama-bench's ``-o json`` format (its fields ``n_prompt``,
``n_gen``, ``avg_ts``, ``stddev_ts``, as llama.cpp's ``tools/llama-bench`` writes them) with log
noise before them, as the real tool does.
"""

from __future__ import annotations

import argparse
import json
import stat

import pytest

from effinfer.bench import gguf as bench_gguf
from effinfer.bench.suite import BenchError
from effinfer.cli import main


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))  # the magic is all the argument check reads
    return path


@pytest.fixture
def no_llama_cpp(tmp_path, monkeypatch):
    """Neither tool on PATH nor in the build cache."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(bench_gguf, "LLAMA_CPP_CACHE", tmp_path / "no-cache")


def _error(capsys, *argv) -> str:
    assert main(["bench", "gguf", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("effinfer bench gguf: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_and_wrong_files(capsys, tmp_path, no_llama_cpp):
    assert "no file at" in _error(capsys, "--model", str(tmp_path / "absent.gguf"))
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    assert "is not a GGUF file" in _error(capsys, "--model", str(text))


def test_missing_llama_bench_says_how_to_build_it(capsys, gguf_file, no_llama_cpp):
    err = _error(capsys, "--model", str(gguf_file))
    assert "llama-bench not found" in err and "build_llama_cpp.sh" in err
    err = _error(capsys, "--model", str(gguf_file), "--llama-bench", str(gguf_file))  # not executable
    assert "--llama-bench" in err and "not an executable file" in err


def _fake_tool(path, body: str):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_llama_server_needed_only_for_serving(capsys, tmp_path, gguf_file, no_llama_cpp):
    tool = _fake_tool(tmp_path / "llama-bench", "exit 0\n")
    err = _error(capsys, "--model", str(gguf_file), "--llama-bench", str(tool))
    assert "llama-server not found" in err
    args = argparse.Namespace(model=str(gguf_file), llama_bench=str(tool), llama_server=None, concurrent=0,
                              threads=2, decode_tokens=64, prefill_tokens=512, repetitions=3,
                              serve_output_tokens=64)  # fmt: skip
    assert bench_gguf.check_arguments(args) == (str(tool), None)
    args.repetitions = 0
    with pytest.raises(BenchError, match="--repetitions must be at least 1"):
        bench_gguf.check_arguments(args)


def test_llama_bench_report_is_read(tmp_path, gguf_file):
    rows = [
        {"build_commit": "abc", "n_prompt": 512, "n_gen": 0, "avg_ts": 321.5, "stddev_ts": 4.5},
        {"build_commit": "abc", "n_prompt": 0, "n_gen": 64, "avg_ts": 98.25, "stddev_ts": 1.0},
    ]
    body = f"echo 'load_backend: loaded CPU backend' >&2\necho 'main: some log'\ncat <<'EOF'\n{json.dumps(rows)}\nEOF\n"
    tool = _fake_tool(tmp_path / "llama-bench", body)
    args = argparse.Namespace(
        model=str(gguf_file), threads=2, prefill_tokens=512, decode_tokens=64, repetitions=3
    )
    result = bench_gguf.llama_bench(str(tool), args)
    assert result["prefill"] == {"mean": 321.5, "sd": 4.5}
    assert result["decode"] == {"mean": 98.25, "sd": 1.0}
    assert result["peak_rss"] > 0 and "-p 512 -n 64 -r 3" in result["command"]

    failing = _fake_tool(tmp_path / "broken", "echo 'error: failed to load model' >&2\nexit 3\n")
    with pytest.raises(BenchError, match="failed to load model"):
        bench_gguf.llama_bench(str(failing), args)
