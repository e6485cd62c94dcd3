"""GGUF loading: dequantisation against gguf-py's reference, stories260K.gguf against the same
weights as an HF directory, ``LLM("x.gguf")``, and ``effinfer convert --to gguf`` round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effinfer.config import ConfigError
from effinfer.loading.gguf import (
    GGUFFile,
    hf_tensor_name,
    is_gguf_file,
    load_model,
    permute_rotary_rows,
    unpermute_rotary_rows,
)
from effinfer.loading.gguf_quants import BLOCK_FORMATS, dequantize, quantize_q8_0
from effinfer.loading.safetensors import load_model as load_safetensors

gguf = pytest.importorskip("gguf")
QType = gguf.GGMLQuantizationType
CPU = torch.device("cpu")

# Byte offsets of each block type's float16 scales: random bytes there could be inf/NaN, so they get real scales.
SCALE_OFFSETS = {
    QType.Q8_0: [0],
    QType.Q4_0: [0],
    QType.Q4_1: [0, 2],
    QType.Q5_0: [0],
    QType.Q5_1: [0, 2],
    QType.Q2_K: [80, 82],
    QType.Q3_K: [108],
    QType.Q4_K: [0, 2],
    QType.Q5_K: [0, 2],
    QType.Q6_K: [208],
}


@pytest.mark.parametrize("qtype", list(BLOCK_FORMATS), ids=lambda t: t.name)
def test_dequantize_is_bit_exact_against_gguf_py(qtype):
    block_values, block_bytes, _ = BLOCK_FORMATS[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(
        0, 256, size=(96, block_bytes), dtype=np.uint8
    )  # every bit pattern of the packed values
    for offset in SCALE_OFFSETS[qtype]:
        raw[:, offset : offset + 2] = rng.normal(size=(96, 1)).astype(np.float16).view(np.uint8)
    rows = raw.reshape(6, 16 * block_bytes)
    expected = gguf.quants.dequantize(rows, qtype)
    ours = dequantize(rows, qtype, (6, 16 * block_values)).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("qtype", [QType.F16, QType.BF16, QType.F32], ids=lambda t: t.name)
def test_float_types_match_gguf_py(qtype):
    values = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(dequantize(raw.view(np.uint8), qtype, (4, 40)).numpy(), expected)


def test_quantize_q8_0_matches_gguf_py():
    values = np.random.default_rng(1).normal(size=(8, 128)).astype(np.float32)
    values[0, :32] = 0  # an all-zero block has scale 0
    expected = gguf.quants.quantize(values, QType.Q8_0)
    np.testing.assert_array_equal(quantize_q8_0(torch.from_numpy(values)).numpy(), expected)


def test_rotary_permutation_round_trips():
    weight = torch.randn(4 * 16, 24)
    permuted = permute_rotary_rows(weight, 4)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_rotary_rows(permuted, 4), weight)
    # llama.cpp's layout pairs adjacent rows: HF rows (0, 8) of head 0 become rows (0, 1).
    assert torch.equal(permuted[1], weight[8])


def test_tensor_names():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.0.unknown.weight") is None


@pytest.fixture(scope="module")
def stories_gguf(shared_data):
    path = shared_data / "stories260K" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip("stories260K.gguf is not present")
    return path


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model.forward_dense(torch.tensor([ids])))[0]


PROMPT = [1, 403, 407, 261, 378, 46, 500, 30, 263, 121]


def test_stories260k_gguf_equals_hf_directory(stories_gguf, stories260k):
    from effinfer.config import ModelConfig

    checkpoint = GGUFFile(stories_gguf)
    config = checkpoint.model_config()
    hf_config = ModelConfig.from_dir(stories260k)
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(config, field) == getattr(hf_config, field), field
    assert (config.bos_token_id, config.eos_token_ids, config.rope_theta) == (1, [2], 10000.0)
    ours = load_model(checkpoint, config, torch.float32, CPU, 64, show_progress=False)
    reference = load_safetensors(stories260k, hf_config, torch.float32, CPU, 64, show_progress=False)
    # q/k are stored permuted for llama.cpp's rotary; un-permuted they are the HF tensors exactly.
    ref_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        if name in ref_params and param.numel():
            assert torch.equal(param, ref_params[name]), name
    assert torch.equal(_logits(ours, PROMPT), _logits(reference, PROMPT))


def test_llm_runs_a_gguf_file(stories_gguf, shared_data):
    from effinfer import LLM, SamplingParams

    llm = LLM(str(stories_gguf), show_progress=False, max_model_len=256)
    assert llm.tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]
    out = llm.generate([[1]], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0]
    expected = (shared_data / "stories260K" / "greedy_reference.txt").read_text()
    assert out.outputs[0].text.strip() and expected.startswith(out.outputs[0].text.strip())


def test_cli_generate_accepts_gguf(stories_gguf, capsys):
    from effinfer.cli import main

    code = main(
        [
            "generate",
            "--model",
            str(stories_gguf),
            "Once upon a time",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.startswith("Once upon a time, there was a little girl")


def test_quantized_file_loads_like_its_dequantised_weights(stories_gguf, tmp_path):
    """A GGUF whose matrices are Q4_0/Q5_1/Q8_0 loads to exactly gguf-py's dequantisation of them."""
    source = GGUFFile(stories_gguf)
    writer = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    for key, value in source.metadata.items():
        if key.startswith("llama."):
            writer.add_key_value(key, value, _value_type(value))
    types = [QType.Q4_0, QType.Q5_1, QType.Q8_0, QType.Q4_1, QType.Q5_0]
    expected = {}
    for index, name in enumerate(source.tensors):
        values = source.tensor(name).numpy()
        qtype = types[index % len(types)] if values.ndim == 2 and values.shape[1] % 32 == 0 else QType.F32
        data = gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    mixed = GGUFFile(tmp_path / "mixed.gguf")
    assert {t.qtype for t in mixed.tensors.values()} >= set(types)
    for name in mixed.tensors:
        np.testing.assert_array_equal(mixed.tensor(name).numpy(), expected[name])
    config = mixed.model_config()
    assert config.dtype == torch.bfloat16  # quantized files run in bfloat16 unless asked otherwise
    model = load_model(mixed, config, torch.float32, CPU, 64, show_progress=False)
    original = load_model(source, source.model_config(), torch.float32, CPU, 64, show_progress=False)
    # 4-bit weights move the logits, but the model still predicts the same next tokens mostly.
    agree = (_logits(model, PROMPT).argmax(-1) == _logits(original, PROMPT).argmax(-1)).float().mean()
    assert agree >= 0.7


def _value_type(value):
    return gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32


def test_not_gguf_and_unsupported_architecture(tmp_path, shared_data):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"NOPE" + bytes(60))
    assert not is_gguf_file(bogus)
    with pytest.raises(ConfigError, match="not a GGUF file"):
        GGUFFile(bogus)
    vocab_only = shared_data / "tokenizers" / "ggml-vocab-gpt-2.gguf"
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        GGUFFile(vocab_only).model_config()


# -------------------------------------------------------------------- convert


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_convert_round_trip(stories260k, stories_gguf, tmp_path, outtype):
    from effinfer.convert import convert_to_gguf
    from effinfer.tokenizer import Tokenizer

    path = convert_to_gguf(stories260k, tmp_path / f"stories-{outtype}.gguf", outtype)
    converted = GGUFFile(path)
    stored = {t.qtype for t in converted.tensors.values()}
    expected_types = {
        "f32": {QType.F32},
        "f16": {QType.F32, QType.F16},
        "bf16": {QType.F32, QType.BF16},
        # ffn_down rows are 172 wide, not a multiple of 32: they fall back to F16.
        "q8_0": {QType.F32, QType.F16, QType.Q8_0},
    }[outtype]
    assert stored == expected_types
    assert converted.metadata["general.architecture"] == "llama"
    original = GGUFFile(stories_gguf)
    reference = _logits(load_model(original, original.model_config(), torch.float32, CPU, 64, False), PROMPT)
    config = converted.model_config()
    logits = _logits(load_model(converted, config, torch.float32, CPU, 64, False), PROMPT)
    tolerance = {"f32": 0.0, "f16": 0.05, "bf16": 0.2, "q8_0": 0.5}[outtype]
    assert (logits - reference).abs().max() <= tolerance
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))

    # The written vocabulary tokenizes as the original GGUF, and as the HF tokenizer except where
    # HF's Metaspace skips the space prefix of a text that starts with a space (llama.cpp does not).
    hf_tokenizer = Tokenizer.from_dir(stories260k)
    tokenizer, original_tokenizer = converted.tokenizer(), original.tokenizer()
    for text in ["Once upon a time, Lily saw a big dog.", "two  spaces\nand a newline", "émoji 🦙!"]:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text) == original_tokenizer.encode(text)
    assert tokenizer.encode(" leading space") == original_tokenizer.encode(" leading space")


def test_convert_command_line(stories260k, tmp_path, capsys):
    from effinfer.convert import main

    out = tmp_path / "cli.gguf"
    assert main([str(stories260k), "--to", "gguf", "--outtype", "q8_0", "-o", str(out)]) == 0
    assert is_gguf_file(out) and "wrote" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), "--to", "gguf"]) == 2


def test_default_model_converts(tmp_path):
    """The built-in default model (byte-level BPE, gpt-2 pre-tokenizer) survives the round trip."""
    from effinfer.config import ModelConfig
    from effinfer.convert import convert_to_gguf
    from effinfer.default_model import DEFAULT_MODEL_DIR
    from effinfer.tokenizer import Tokenizer

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the default model is not present")
    path = convert_to_gguf(DEFAULT_MODEL_DIR, tmp_path / "default.gguf", "f32")
    converted = GGUFFile(path)
    assert converted.metadata["tokenizer.ggml.pre"] == "gpt-2"
    hf_config = ModelConfig.from_dir(DEFAULT_MODEL_DIR)
    reference = load_safetensors(DEFAULT_MODEL_DIR, hf_config, torch.float32, CPU, 64, False)
    model = load_model(converted, converted.model_config(), torch.float32, CPU, 64, False)
    hf_tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    tokenizer = converted.tokenizer()
    text = "import os\n\n\ndef main(argv):\n    if not argv:  # nothing\n\treturn  os.getcwd()\n"
    ids = hf_tokenizer.encode(text)
    assert tokenizer.encode(text) == ids
    assert torch.allclose(_logits(model, ids), _logits(reference, ids), atol=1e-4)


def test_serve_accepts_gguf(stories_gguf):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from effinfer import EngineConfig, LLMEngine
    from effinfer.engine.async_engine import AsyncLLMEngine
    from effinfer.serve.app import build_app

    engine = LLMEngine(stories_gguf, EngineConfig(show_progress=False, max_model_len=256))
    app = build_app(AsyncLLMEngine(engine), "stories", api_key=None)
    with TestClient(app) as client:
        body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].startswith(", there was a little girl")


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE}),
        ("Qwen2ForCausalLM", {}),
        ("Qwen3ForCausalLM", {}),
    ],
    ids=["llama", "llama-tied-llama3rope", "qwen2", "qwen3"],
)
def test_converted_architectures_match_transformers(tmp_path, arch, overrides):
    """convert -> GGUF -> load gives transformers' logits: q/k permutation (llama only), biases (qwen2),
    q/k norms and head_dim (qwen3), tied embeddings and Llama 3 rope factors survive the trip."""
    from effinfer.convert import convert_to_gguf

    from .conftest import make_hf_model

    hf_model, directory = make_hf_model(arch, tmp_path / "hf", **overrides)
    path = convert_to_gguf(directory, tmp_path / "model.gguf", "f32")
    checkpoint = GGUFFile(path)
    config = checkpoint.model_config()
    assert config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    model = load_model(checkpoint, config, torch.float32, CPU, 128, show_progress=False)
    ids = list(range(3, 120, 3))
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0])
def test_q8_0_and_q4_0_layers_stay_quantized(stories_gguf, tmp_path, qtype):
    """Q8_0 / Q4_0 layer weights load quantized (no dequantising) with the same numbers."""
    from effinfer.layers.linear import Linear
    from effinfer.loading.builder import fill_model
    from effinfer.loading.gguf import build_model, hf_tensors

    source = GGUFFile(stories_gguf)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for key, value in source.metadata.items():
        if key.startswith("llama."):
            writer.add_key_value(key, value, _value_type(value))
    for name in source.tensors:
        values = source.tensor(name).numpy()
        # stories260K's 172-wide down projection has no 32-value blocks: it stays F32, like llama.cpp does.
        kind = qtype if values.ndim == 2 and values.shape[1] % 32 == 0 else QType.F32
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    quantized_file = GGUFFile(tmp_path / "q.gguf")
    config = quantized_file.model_config()
    model = load_model(quantized_file, config, torch.float32, CPU, 64, show_progress=False)
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.quantized is not None]
    # qkv, o, gate_up (down is F32), and lm_head
    assert len(layers) == 3 * config.num_layers + 1
    assert {m.quantized.bits for m in layers} == {8 if qtype == QType.Q8_0 else 4}
    dequantised = build_model(config, torch.float32, CPU, 64)
    fill_model(dequantised, config, hf_tensors(quantized_file, config), 1, "q.gguf", show_progress=False)
    from effinfer.loading.builder import finalize_model

    finalize_model(dequantised, CPU, torch.float32)
    torch.testing.assert_close(_logits(model, PROMPT), _logits(dequantised, PROMPT), rtol=1e-4, atol=1e-4)
