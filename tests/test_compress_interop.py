"""A pruned and a low-rank factorized model are ordinary effinfer models afterwards: they can be
quantized (pruned), served and benchmarked, and what cannot be done (quantizing a factorized
checkpoint) is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from effinfer import LLM, SamplingParams
from effinfer.bench import main as bench_main
from effinfer.cli import main as cli_main
from effinfer.layers.linear import Linear
from effinfer.quant.integer import quantize_rtn
from tests.conftest import make_hf_model
from tests.test_bench import SMALL_RUN

CALIB = ["--num-samples", "4", "--seq-len", "32"]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    _, path = make_hf_model("LlamaForCausalLM", tmp_path_factory.mktemp("interop"))
    return path


@pytest.fixture(scope="module")
def pruned(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("interop") / "wanda"
    argv = ["prune", "--model", str(source), "--method", "wanda", "--sparsity", "0.5", "--out", str(out)]
    assert cli_main([*argv, *CALIB]) == 0
    return out


@pytest.fixture(scope="module")
def factorized(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("interop") / "svd"
    argv = ["compress", "--model", str(source), "--low-rank", "0.6", "--method", "svd", "--out", str(out)]
    assert cli_main(argv) == 0
    return out


def test_a_pruned_model_quantizes_and_keeps_its_zeros(pruned, tmp_path):
    out = tmp_path / "int8"
    argv = ["quantize", "--model", str(pruned), "--method", "rtn", "--bits", "8", "--out", str(out)]
    assert cli_main(argv) == 0
    pruned_weights = load_file(str(pruned / "model.safetensors"))
    model = LLM(str(out), dtype="float32", show_progress=False).engine.runner.model
    checked = 0
    for name, linear in model.compressible_linears():
        parent = name.rpartition(".")[0]
        # The fused Linear's rows are the checkpoint tensors in split order, each quantized on its own.
        for offset, (tensor, rows) in zip(_offsets(model, linear), model.split_sizes(linear).items()):
            weight = pruned_weights[f"{parent}.{tensor}.weight"].float()
            codes = linear.quantized.qweight[offset : offset + rows]
            assert torch.equal(codes, quantize_rtn(weight, 8, None, True).qweight), f"{parent}.{tensor}"
            dequantized = linear.quantized.rows(offset, offset + rows).dequantize()
            assert (dequantized[weight == 0] == 0).all()  # symmetric int8 keeps every pruned weight at 0
            checked += 1
    assert checked == 7 * json.loads((pruned / "config.json").read_text())["num_hidden_layers"]
    assert len(LLM(str(out), show_progress=False).generate([PROMPT], SamplingParams(max_tokens=4))[0].outputs[0].token_ids) == 4  # fmt: skip


def _offsets(model, linear: Linear) -> list[int]:
    sizes = list(model.split_sizes(linear).values())
    return [sum(sizes[:i]) for i in range(len(sizes))]


@pytest.mark.parametrize("which", ["pruned", "factorized"])
def test_compressed_models_benchmark(which, request, tmp_path):
    model = request.getfixturevalue(which)
    json_path = tmp_path / "bench.json"
    assert bench_main(["--model", str(model), *SMALL_RUN, "--concurrent", "0", "--json", str(json_path)]) == 0
    result = json.loads(json_path.read_text())
    assert result["results"]["decode"] and result["results"]["offline"]


def test_a_factorized_model_serves_what_it_generates_offline(factorized):
    pytest.importorskip("fastapi")
    from tests.test_serve import MODEL, start_server

    server = start_server(factorized)
    try:
        completion = server.client().completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0
        )
        offline = LLM(str(factorized), show_progress=False).generate(
            [PROMPT], SamplingParams(temperature=0, max_tokens=8)
        )
        assert completion.choices[0].text == offline[0].outputs[0].text
        assert completion.usage.completion_tokens == 8
    finally:
        server.stop()


def test_quantizing_a_factorized_model_is_one_clear_line(factorized, tmp_path, capsys):
    argv = [
        "quantize",
        "--model",
        str(factorized),
        "--method",
        "rtn",
        "--bits",
        "8",
        "--out",
        str(tmp_path / "q"),
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already quantized (effinfer)" in err, err
