"""effinfer bench: random-weight models, the measurements, the reports and the command line.

Only behaviour is checked here; nothing asserts a speed (the machine may be busy)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from effinfer import LLM, SamplingParams
from effinfer.bench import build_parser, main
from effinfer.bench.models import PRESETS, hf_config, make_random_model, tensor_shapes
from effinfer.bench.throughput import weight_read_bytes
from effinfer.bench.workload import parse_range, random_workload

SMALL_RUN = [
    "--batch-decode-tokens",
    "4",
    "--decode-input-len",
    "8",
    "--num-requests",
    "3",
    "--input-len-range",
    "4:12",
    "--output-len-range",
    "2:5",
    "--concurrent",
    "2",
    "--concurrent-input-len",
    "6",
    "--concurrent-output-len",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("bench") / "tiny", preset="tiny", seed=0)


def test_tiny_random_model_loads_in_transformers_and_effinfer(tiny_model):
    import transformers
    from safetensors import safe_open

    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "bfloat16"
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensor_shapes(config))
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
        assert torch.all(f.get_tensor("model.layers.0.input_layernorm.weight") == 1)
        std = f.get_tensor("model.layers.1.mlp.down_proj.weight").float().std().item()
        assert 0.015 < std < 0.025

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    assert hf.config.hidden_size == 64 and hf.config.num_key_value_heads == 2
    assert hf.config.vocab_size == 32000 and not hf.config.tie_word_embeddings
    prompt = [1, 450, 4996, 17354, 1701]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = expected[0, len(prompt) :].tolist()

    llm = LLM(str(tiny_model), dtype="float32", show_progress=False)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected
    # The default dtype is the checkpoint's.
    assert LLM(str(tiny_model), show_progress=False).engine.dtype == torch.bfloat16


def test_random_model_without_shared_tokenizer_gets_a_byte_level_one(tmp_path):
    path = make_random_model(tmp_path / "m", preset="tiny", tokenizer_dir=tmp_path / "absent")
    llm = LLM(str(path), show_progress=False)
    assert llm.tokenizer.decode(llm.tokenizer.encode("héllo", add_special_tokens=False)) == "héllo"
    out = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4  # every id of the 32000-token vocabulary decodes


def test_tinyllama_preset_has_tinyllamas_shape():
    config = hf_config("tinyllama-1.1b")
    count = sum(torch.Size(s).numel() for s in tensor_shapes(config).values())
    assert count == 1_100_048_384
    assert PRESETS["tinyllama-1.1b"]["num_key_value_heads"] == 4
    with pytest.raises(ValueError, match="unknown preset"):
        hf_config("nope")


def test_weight_read_bytes_skips_an_untied_embedding_and_counts_a_tied_one_once():
    class Toy(nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = nn.Embedding(100, 8)
            self.proj = nn.Linear(8, 8, bias=False)
            self.head = nn.Linear(8, 100, bias=False)
            if tied:
                self.head.weight = self.embed.weight

    assert weight_read_bytes(Toy(tied=False)) == 4 * (8 * 8 + 100 * 8)
    assert weight_read_bytes(Toy(tied=True)) == 4 * (8 * 8 + 100 * 8)
    assert weight_read_bytes(Toy(tied=False).to(torch.bfloat16)) == 2 * (8 * 8 + 100 * 8)


def test_workloads_are_seeded_and_within_range():
    a = random_workload("w", random.Random(3), 20, (4, 9), (2, 5), 1000)
    b = random_workload("w", random.Random(3), 20, (4, 9), (2, 5), 1000)
    assert a == b
    assert all(4 <= len(p) <= 9 for p in a.prompts) and all(2 <= n <= 5 for n in a.output_lens)
    assert all(0 <= t < 1000 for p in a.prompts for t in p)
    assert parse_range("32:256") == (32, 256) and parse_range("7") == (7, 7)
    for bad in ("0:4", "9:3", "a:b"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_parser_takes_the_suite_and_the_make_model_action():
    parser = build_parser()
    args = parser.parse_args(["--model", "m", "--compare", "hf", "--input-len-range", "8:16"])
    assert args.bench_action is None and args.input_len_range == (8, 16) and args.concurrent == 16
    args = parser.parse_args(["make-model", "--preset", "tiny", "--out", "d"])
    assert args.bench_action == "make-model" and args.preset == "tiny" and args.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--input-len-range", "5:2"])


def test_make_model_action_and_missing_model(tmp_path, capsys):
    assert main(["make-model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["--no-progress"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "m"), "--batch-decode-tokens", "5000", "--no-progress"]) == 2


def test_bench_against_hf_end_to_end(tiny_model, tmp_path, capsys):
    json_path, md_path, plot_path = tmp_path / "r.json", tmp_path / "docs" / "b.md", tmp_path / "b.png"
    md_path.parent.mkdir()
    md_path.write_text("# Benchmarks\n")
    argv = ["--model", str(tiny_model), "--compare", "hf", *SMALL_RUN]
    argv += ["--json", str(json_path), "--markdown", str(md_path), "--plot", str(plot_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()

    result = json.loads(json_path.read_text())
    assert result["engines"] == ["effinfer", "HF"]
    assert result["model"]["parameters"] == 4_170_048
    # Weights read per decode step: everything but the (untied) embedding table, in bf16.
    assert result["model"]["weight_bytes_per_decode_step"] == 2 * (4_170_048 - 32000 * 64)
    decode, offline, concurrent = (result["results"][k] for k in ("decode", "offline", "concurrent"))
    for engine in ("effinfer", "HF"):
        assert decode[engine]["decode_tokens"] == 4 and decode[engine]["tokens_per_s"] > 0
        assert decode[engine]["weight_gb_per_s"] > 0
        for scenario in (offline, concurrent):
            assert scenario[engine]["output_tokens_per_s"] > 0 and scenario[engine]["total_tokens_per_s"] > 0
    assert len(offline["prompt_lens"]) == len(offline["output_lens"]) == 3
    assert (
        offline["effinfer"]["output_tokens"] == offline["HF"]["output_tokens"] == sum(offline["output_lens"])
    )
    # HF pads every row to the longest output; effinfer computes only what was asked for.
    assert offline["HF"]["generated_tokens"] == 3 * max(offline["output_lens"])
    assert offline["effinfer"]["generated_tokens"] == sum(offline["output_lens"])
    assert concurrent["HF"]["generated_tokens"] == concurrent["HF"]["output_tokens"] == 2 * 3
    assert set(result["ratios"]) == {
        "decode_tokens_per_s",
        "offline_output_tokens_per_s",
        "offline_total_tokens_per_s",
        "concurrent_output_tokens_per_s",
        "concurrent_total_tokens_per_s",
    }
    assert all(r > 0 for r in result["ratios"].values())

    markdown = md_path.read_text()
    assert markdown.startswith("# Benchmarks\n")
    assert "effinfer bench --model" in markdown and "--compare hf" in markdown
    assert " UTC" in markdown and result["machine"]["cpu"] in markdown and "torch " in markdown
    assert "| batch-1 decode" in markdown and "effinfer/HF" in markdown

    assert "effinfer/HF" in captured.out and "decode tokens/s" in captured.out
    try:
        import matplotlib  # noqa: F401

        assert plot_path.stat().st_size > 0
    except ImportError:
        assert not plot_path.exists() and "matplotlib is not installed" in captured.err


def test_bench_without_peer_has_no_ratios(tiny_model, tmp_path):
    json_path = tmp_path / "r.json"
    assert main(["--model", str(tiny_model), *SMALL_RUN, "--concurrent", "0", "--json", str(json_path)]) == 0
    result = json.loads(json_path.read_text())
    assert result["engines"] == ["effinfer"] and result["ratios"] == {}
    assert set(result["results"]) == {"decode", "offline"}


def test_bench_quant_runs_and_reports(tmp_path, capsys):
    """`effinfer bench quant`: every scheme decodes, ratios are against bf16, the layer table renders."""
    from effinfer.bench.quant import layer_table
    from effinfer.default_model import default_model_path

    out = tmp_path / "bq.json"
    argv = ["quant", "--model", str(default_model_path()), "--schemes", "int8,int4", "--rounds", "1",
            "--decode-tokens", "4", "--no-progress", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| effinfer | bf16 |" in text and "| effinfer | int4 |" in text
    import json

    variants = json.loads(out.read_text())["variants"]
    assert [v["name"] for v in variants] == ["effinfer bf16", "effinfer int8", "effinfer int4"]
    bf16, int8, int4 = (v["weight_bytes"] for v in variants)
    assert int4 < int8 < bf16
    rows = layer_table(64, 96, copies=2, batch_sizes=(1, 3), repeats=1)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["int8_ms"] > 0 and r["int4_speedup"] > 0 for r in rows)
