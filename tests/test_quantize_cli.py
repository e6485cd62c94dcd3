"""``effinfer quantize`` end to end: CLI -> checkpoint -> LLM / eval ppl / serve, quantization while
loading, and the errors a user can make."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.cli import main as cli_main
from effinfer.eval import perplexity
from effinfer.layers.linear import Linear
from effinfer.quant.integer import quantize_rtn
from tests.test_perplexity import CLI_RESULT

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["Once upon a time", "The dog"]


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def rtn_int8_dir(stories260k, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "rtn8"
    assert (
        cli_main(
            ["quantize", "--model", str(stories260k), "--method", "rtn", "--bits", "8", "--out", str(out)]
        )
        == 0
    )
    return out


def test_quantize_cli_writes_a_gptq_checkpoint_that_loads(stories260k, rtn_int8_dir):
    config = json.loads((rtn_int8_dir / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 8 and q["sym"] is True
    assert (rtn_int8_dir / "tokenizer.json").is_file()
    quantized = LLM(str(rtn_int8_dir), dtype="float32", show_progress=False).engine.runner.model
    reference = LLM(str(stories260k), dtype="float32", show_progress=False).engine.runner.model
    layers = [
        (n, m) for n, m in quantized.named_modules() if isinstance(m, Linear) and m.quantized is not None
    ]
    assert len(layers) == 5 * 4  # qkv, o, gate_up, down in each of 5 layers; lm_head stays float
    float_layers = dict(reference.named_modules())
    for name, layer in layers:
        float_weight = float_layers[name]._kernel_state.weight  # float32: kept plain by the dense backend
        expected = quantize_rtn(float_weight, 8, None, True)
        assert torch.equal(layer.quantized.qweight, expected.qweight), name
        torch.testing.assert_close(layer.quantized.scales, expected.scales, rtol=1e-3, atol=0)  # stored fp16


def test_int8_weights_stay_close_to_float(stories260k):
    """int8 per-channel RTN changes the greedy continuation of a trained model hardly at all."""
    float_llm = LLM(str(stories260k), dtype="float32", show_progress=False)
    int8_llm = LLM(str(stories260k), dtype="float32", quantization="int8", show_progress=False)
    agree = sum(a == b for x, y in zip(_tokens(float_llm), _tokens(int8_llm)) for a, b in zip(x, y))
    assert agree >= 0.8 * len(PROMPTS) * GREEDY.max_tokens


def test_online_quantized_layer_matches_reference(stories260k):
    llm = LLM(str(stories260k), dtype="float32", quantization="int4", show_progress=False)
    layer = llm.engine.runner.model.model.layers[0].mlp.down_proj  # 172 wide: a short last group
    assert layer.quantized.bits == 4 and layer.quantized.group_size == 128
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(layer(x), layer.quantized.reference_linear(x, None), rtol=1e-4, atol=1e-4)


def test_eval_ppl_accepts_the_quantized_model(stories260k, rtn_int8_dir, shared_data, capsys):
    data = shared_data / "text" / "tinystories_valid.txt"
    args = [
        "eval",
        "ppl",
        "--model",
        str(rtn_int8_dir),
        "--data",
        str(data),
        "--ctx",
        "128",
        "--max-windows",
        "2",
    ]
    assert cli_main([*args, "--dtype", "float32"]) == 0
    printed = CLI_RESULT.search(capsys.readouterr().out)
    assert printed, "eval ppl printed no result line"
    # The CLI reports what the Python API measures on the quantized checkpoint ...
    quantized = perplexity(
        LLM(str(rtn_int8_dir), dtype="float32", show_progress=False),
        path=data, ctx=128, max_windows=2, show_progress=False,
    )  # fmt: skip
    assert int(printed["tokens"]) == quantized.num_tokens == 2 * 127
    assert float(printed["ppl"]) == pytest.approx(quantized.perplexity, abs=5e-5)  # printed to 4 decimals
    # ... and int8 per-channel RTN moves a trained model's perplexity by well under a percent, so
    # the number is the quantized model's and not something unrelated (the float one is held to
    # transformers in test_perplexity.py).
    original = perplexity(
        LLM(str(stories260k), dtype="float32", show_progress=False),
        path=data, ctx=128, max_windows=2, show_progress=False,
    )  # fmt: skip
    assert quantized.perplexity != original.perplexity
    assert quantized.perplexity == pytest.approx(original.perplexity, rel=0.01)


def test_generate_cli_with_quantization_and_int8_kv(stories260k, capsys):
    args = ["generate", "--model", str(stories260k), "--quantization", "int4", "--kv-cache-dtype", "int8",
            "--temperature", "0", "--max-tokens", "8", "Once upon a time"]  # fmt: skip
    assert cli_main(args) == 0
    # The CLI echoes the prompt, so only the continuation says anything: it must be the greedy one.
    llm = LLM(str(stories260k), quantization="int4", kv_cache_dtype="int8", show_progress=False)
    expected = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert len(expected.token_ids) == 8
    assert capsys.readouterr().out == "Once upon a time" + expected.text + "\n"


def test_serve_runs_a_quantized_checkpoint(rtn_int8_dir):
    pytest.importorskip("fastapi")
    from tests.test_serve import MODEL, start_server

    server = start_server(rtn_int8_dir)
    try:
        completion = server.client().completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0
        )
        offline = LLM(str(rtn_int8_dir), show_progress=False).generate(
            [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8)
        )
        assert completion.choices[0].text == offline[0].outputs[0].text
    finally:
        server.stop()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "smoothquant", "--bits", "4"], "--bits must be 8"),
        (["--method", "awq", "--bits", "8"], "4 bits"),
        (["--method", "gptq", "--calib", "/nonexistent/calib.txt"], "does not exist"),
    ],
)
def test_quantize_cli_errors(stories260k, tmp_path, capsys, extra, message):
    args = ["quantize", "--model", str(stories260k), "--out", str(tmp_path / "out"), *extra]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_quantize_refuses_overwriting_or_requantizing(stories260k, rtn_int8_dir, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(stories260k, copy)
    assert cli_main(["quantize", "--model", str(copy), "--method", "rtn", "--out", str(copy)]) == 2
    assert "--out must differ" in capsys.readouterr().err
    assert (
        cli_main(["quantize", "--model", str(rtn_int8_dir), "--method", "rtn", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "already quantized" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "quantize",
                "--model",
                str(tmp_path / "missing"),
                "--method",
                "rtn",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_unknown_online_quantization_is_a_clear_error(stories260k):
    from effinfer.config import ConfigError

    with pytest.raises(ConfigError, match="unknown quantization"):
        LLM(str(stories260k), quantization="int3", show_progress=False)


def test_quantized_linear_reports_packed_bytes():
    layer = Linear(256, 64)
    layer.weight.data.normal_()
    dense_bytes = layer.weight_nbytes()
    layer.set_quantized(quantize_rtn(layer.weight.data, 4, 64, False))
    # 4-bit codes plus one fp16 scale and one 4-bit zero per 64 weights: ~4.3 bits per weight.
    assert layer.weight_nbytes() == pytest.approx(dense_bytes * 4.31 / 32, rel=0.02)
