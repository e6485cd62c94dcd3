"""The ``effinfer`` command line: every command registers the same way, engine defaults come from
``EngineConfig`` only, and a usage or user error is one line with a non-zero exit."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from effinfer import LLM, EngineConfig
from effinfer.cli import build_parser, main
from effinfer.config import EngineArgs

FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command path the parser knows, subcommands included (``("bench", "serve")``, ...)."""
    paths = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths[(*prefix, name)] = sub
                paths.update(_commands(sub, (*prefix, name)))
    return paths


def test_every_command_is_registered_and_has_help(capsys):
    commands = _commands(build_parser())
    expected = set(
        "generate chat serve eval quantize convert bench train distill report compress prune".split()
    )
    assert {path[0] for path in commands} == expected
    assert {("eval", "ppl"), ("bench", "make-model"), ("bench", "quant"), ("bench", "serve")} <= set(commands)
    for path in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith(f"usage: effinfer {' '.join(path)} "), path


def test_every_command_sets_its_own_func():
    funcs = {path: sub.get_default("func") for path, sub in _commands(build_parser()).items()}
    del funcs[("eval",)]  # only a group: its subcommand runs
    assert all(callable(func) for func in funcs.values()), funcs
    assert len({funcs[("bench",)], funcs[("bench", "quant")], funcs[("bench", "serve")]}) == 3


def test_unknown_command_is_one_line_and_non_zero():
    result = subprocess.run(
        [sys.executable, "-m", "effinfer.cli", "frobnicate"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("effinfer: error:") and "frobnicate" in lines[0]


def test_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--max-num-seqs", "many", "hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-num-seqs" in err and "'many'" in err


def _help_entries(help_text: str) -> dict[str, str]:
    """``--flag`` -> its help, joined over argparse's wrapped lines."""
    entries: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag is not None and line.startswith("    "):
            entries[flag] += line
        else:
            flag = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_generate_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    entries = _help_entries(capsys.readouterr().out)
    for spec in EngineArgs.FLAGS:
        default = FIELD_DEFAULTS[spec.field]
        if default is None or isinstance(default, bool):
            assert "(default: " not in entries[spec.flag] or "(default: the" in entries[spec.flag]
        else:
            assert entries[spec.flag].endswith(f"(default: {default})"), entries[spec.flag]


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"], ["eval", "ppl", "--data", "x"]])
def test_unset_engine_flags_are_the_dataclass_defaults(command):
    args = build_parser().parse_args(command)
    for spec in EngineArgs.FLAGS:
        assert getattr(args, spec.field) == FIELD_DEFAULTS[spec.field], spec.flag
    assert EngineArgs.from_cli_args(args) == EngineConfig()


def test_engine_flags_map_to_config_fields():
    args = build_parser().parse_args(
        ["generate", "hi", "--dtype", "float32", "--kv-cache-memory", "2M", "--max-num-seqs", "3",
         "--max-model-len", "128", "--block-size", "32", "--no-prefix-caching", "--threads", "2",
         "--quantization", "int8", "--kv-cache-dtype", "int8", "--kv-cache-memory-fraction", "0.25"]
    )  # fmt: skip
    config = EngineArgs.from_cli_args(args)
    assert config == EngineConfig(
        dtype="float32",
        kv_cache_memory=2 << 20,
        max_num_seqs=3,
        max_model_len=128,
        block_size=32,
        enable_prefix_caching=False,
        num_threads=2,
        quantization="int8",
        kv_cache_dtype="int8",
        kv_cache_memory_fraction=0.25,
    )


def test_python_api_has_no_defaults_of_its_own():
    """``LLM(**kwargs)`` passes the engine settings to EngineConfig, whose defaults are the only ones."""
    import inspect

    parameters = inspect.signature(LLM.__init__).parameters
    assert [p.name for p in parameters.values()] == ["self", "model", "engine_args"]


def test_user_errors_inside_commands_are_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effinfer: error:") and "does not exist" in err and err.count("\n") == 1

    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--rate", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "effinfer: error: --rate must be positive\n"

    assert main(["bench", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effinfer: error: --model is required") and err.count("\n") == 1
