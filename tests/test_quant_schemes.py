"""Conformance of every registered quantization scheme (``effinfer/quant/registry.py``).

Parametrized from the registry, so a newly registered scheme is checked without editing this
file: the kernel ``Linear.finalize`` picks on this machine and the kernel-less fallback against
the weight's ``reference_linear``; ``rows`` / ``cat_rows`` round trips; save / load through a
safetensors file; ``to(device)``; a fused Linear built from quantized checkpoint shards; and the
lists the CLI, ``EngineConfig``, quantize-on-load and ``bench quant`` derive from the registry.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from effinfer.kernels import quant_linear
from effinfer.layers.linear import Linear
from effinfer.quant import registry
from effinfer.quant.base import CompressedWeight
from effinfer.quant.codebook import quantize_codebook

SCHEMES = list(registry.SCHEMES)
OUT, IN = 48, 128  # 48 rows split as 16 + 32 start on NF4's 64-value block boundaries


def float_weight(seed: int = 0, rows: int = OUT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, IN, generator=gen) * 0.05


def activations(rows: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    # A few large columns, so LLM.int8() takes some columns apart (its threshold is 6).
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN, generator=gen)
    x[:, 3] *= 20
    return x.to(dtype)


def compressed(name: str, seed: int = 0) -> CompressedWeight:
    weight = registry.SCHEMES[name].quantize(float_weight(seed))
    assert isinstance(weight, registry.SCHEMES[name].weight_type)
    return weight


def assert_close(y: torch.Tensor, expected: torch.Tensor) -> None:
    # bf16 output is rounded once (2**-9 relative) and bf16 kernels accumulate partial sums in
    # bf16 steps; float32 kernels differ from the fp32 reference by summation order only.
    assert y.dtype == expected.dtype and y.shape == expected.shape
    tol = 1e-2 if y.dtype == torch.bfloat16 else 1e-4
    err = (y.float() - expected.float()).abs().max()
    scale = expected.float().abs().max()
    assert err <= tol * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


def tensors_equal(a: CompressedWeight, b: CompressedWeight) -> bool:
    (ta, ma), (tb, mb) = a.state_dict(), b.state_dict()
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k].cpu(), tb[k].cpu()) for k in ta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("name", SCHEMES)
def test_kernel_matches_reference(name, rows, dtype):
    entry = registry.SCHEMES[name]
    weight = compressed(name)
    bias = torch.randn(OUT) * 0.1
    layer = Linear(IN, OUT, bias=True).to(dtype)
    layer.bias.data.copy_(bias)
    layer.set_quantized(weight, entry.act_quant)
    layer.finalize()
    x = activations(rows, dtype)
    expected = weight.reference_linear(x, layer.bias.data, entry.act_quant)
    with torch.no_grad():
        assert_close(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", SCHEMES)
def test_fallback_matches_reference(name, dtype):
    entry = registry.SCHEMES[name]
    weight = compressed(name)
    bias = (torch.randn(OUT) * 0.1).to(dtype)
    state = quant_linear.fallback(weight, bias, entry.act_quant, dtype)
    x = activations(9, dtype)
    assert_close(quant_linear.apply(state, x), weight.reference_linear(x, bias, entry.act_quant))


@pytest.mark.parametrize("name", SCHEMES)
def test_rows_and_cat_rows_round_trip(name):
    weight = compressed(name)
    dense = weight.dequantize()
    parts = [weight.rows(0, 16), weight.rows(16, OUT)]
    assert [(p.out_features, p.in_features) for p in parts] == [(16, IN), (OUT - 16, IN)]
    assert torch.equal(parts[0].dequantize(), dense[:16])
    assert torch.equal(parts[1].dequantize(), dense[16:])
    joined = type(weight).cat_rows(parts)
    assert torch.equal(joined.dequantize(), dense)
    assert tensors_equal(joined, weight)


@pytest.mark.parametrize("name", SCHEMES)
def test_save_and_load_round_trip(name, tmp_path):
    weight = compressed(name)
    tensors, metadata = weight.state_dict()
    path = tmp_path / "weight.safetensors"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"m": json.dumps(metadata)}
    )
    loaded = type(weight).from_state_dict(load_file(str(path)), json.loads(json.dumps(metadata)))
    assert tensors_equal(loaded, weight)
    assert torch.equal(loaded.dequantize(), weight.dequantize())
    assert loaded.nbytes() == weight.nbytes() > 0


def test_double_quantized_codebook_round_trips(tmp_path):
    """NF4 with 8-bit absmax (QLoRA's double quantization) keeps its nested state through save, split and join."""
    weight = quantize_codebook(float_weight(rows=512), "nf4", 64, double_quant=True)
    tensors, metadata = weight.state_dict()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "w.safetensors"))
    loaded = type(weight).from_state_dict(load_file(str(tmp_path / "w.safetensors")), metadata)
    assert tensors_equal(loaded, weight) and loaded.nbytes() == weight.nbytes()
    joined = type(weight).cat_rows([weight.rows(0, 256), weight.rows(256, 512)])
    assert torch.equal(joined.dequantize(), weight.dequantize()) and len(joined.nested) == 2


@pytest.mark.parametrize("name", SCHEMES)
def test_to_device(name):
    weight = compressed(name)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        moved = weight.to(device)
        assert type(moved) is type(weight) and moved.device.type == device.type
        assert all(t.device.type == device.type for t in moved.state_dict()[0].values())
        assert torch.equal(moved.dequantize().cpu(), weight.dequantize())


@pytest.mark.parametrize("name", SCHEMES)
def test_linear_fuses_quantized_shards(name):
    entry = registry.SCHEMES[name]
    dense = float_weight()
    layer = Linear(IN, [16, OUT - 16])
    parts = [entry.quantize(dense[:16]), entry.quantize(dense[16:])]
    layer.load_quantized_shard(parts[1], 1, entry.act_quant)
    assert layer.quantized is None  # not every shard arrived yet
    layer.load_quantized_shard(parts[0], 0, entry.act_quant)
    assert isinstance(layer.quantized, entry.weight_type) and layer.act_quant == entry.act_quant
    fused = torch.cat([p.dequantize() for p in parts])
    assert torch.equal(layer.dequantized_weight().float(), fused)
    assert layer.weight_nbytes() == layer.quantized.nbytes()
    x = activations(5, torch.float32)
    with torch.no_grad():
        before = layer(x)  # before finalize: the reference itself
        assert torch.equal(before, layer.quantized.reference_linear(x, None, entry.act_quant))
        layer.finalize()
        assert_close(layer(x), before)
    with pytest.raises(ValueError, match="shard 0 is 16x64"):
        Linear(IN, [16, 32]).load_quantized_shard(entry.quantize(float_weight()[:16, :64]), 0)
    with pytest.raises(ValueError, match="quantized weight is 16x128"):
        Linear(IN, OUT).set_quantized(parts[0])


def test_fusing_shards_of_different_types_is_refused():
    layer = Linear(IN, [16, OUT - 16])
    first, second = list(registry.weight_types())[:2]
    schemes = {s.weight_type: s for s in registry.SCHEMES.values()}
    layer.load_quantized_shard(schemes[first].quantize(float_weight()[:16]), 0)
    with pytest.raises(ValueError, match="different weight types"):
        layer.load_quantized_shard(schemes[second].quantize(float_weight()[16:]), 1)


def test_lists_derive_from_the_registry(capsys):
    from effinfer.bench import quant as bench_quant
    from effinfer.cli import build_parser, main
    from effinfer.config import ConfigError, EngineConfig

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    choices = next(a.choices for a in generate._actions if a.dest == "quantization")
    assert list(choices) == SCHEMES
    assert [s for s in bench_quant.SCHEMES if s != "bf16"] == SCHEMES
    for name in SCHEMES:
        assert EngineConfig(quantization=name).quantization == name
    with pytest.raises(ConfigError, match="unknown quantization 'int3'; choose from"):
        EngineConfig(quantization="int3")
    assert main(["bench", "quant", "--model", "unused", "--schemes", "bf16,int3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and f"choose from {', '.join(bench_quant.SCHEMES)}" in err


@pytest.mark.parametrize("name", SCHEMES)
def test_quantize_on_load(name, tmp_path):
    from effinfer.config import ModelConfig
    from effinfer.layers.linear import quantizable_linears
    from effinfer.loading.online_quant import quantize_on_load
    from effinfer.loading.safetensors import load_model
    from tests.conftest import make_hf_model

    _, path = make_hf_model("LlamaForCausalLM", tmp_path / "m")
    model = load_model(path, ModelConfig.from_dir(path), torch.float32, torch.device("cpu"), 64, False, False)
    floats = {n: m.weight.data.clone() for n, m in quantizable_linears(model)}
    entry = registry.SCHEMES[name]
    quantize_on_load(model, name, show_progress=False)
    for layer_name, linear in quantizable_linears(model):
        assert isinstance(linear.quantized, entry.weight_type) and linear.act_quant == entry.act_quant
        # Each checkpoint tensor of a fused layer is quantized on its own.
        start = 0
        for rows in linear.shard_sizes:
            expected = entry.quantize(floats[layer_name][start : start + rows]).dequantize()
            assert torch.equal(linear.quantized.dequantize()[start : start + rows], expected)
            start += rows
    assert (model.lm_head.quantized is not None) == (entry.quantize_lm_head is not None)


def test_offline_methods_come_from_their_registry(tmp_path, capsys):
    from effinfer.cli import build_parser, main
    from effinfer.compress.quant.pipeline import METHODS, QuantizeOptions
    from effinfer.config import ConfigError

    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    assert list(next(a.choices for a in quantize._actions if a.dest == "method")) == list(METHODS)
    for name, method in METHODS.items():
        bits = 8 if name in ("smoothquant", "w8a8-naive", "llm_int8") else 4
        assert QuantizeOptions(method=name, bits=bits).format == method.formats[0]
    with pytest.raises(ConfigError, match="--method nf4 writes bitsandbytes, not --format gptq"):
        QuantizeOptions(method="nf4", format="gptq")
    assert main(["quantize", "--method", "nf4", "--format", "gptq", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "not --format gptq" in err and "Traceback" not in err
