"""Checkpoints in transformers' bitsandbytes layout (4-bit NF4 with double quant, 8-bit LLM.int8) load and run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from effinfer.quant.llm_int8 import LLMInt8Weight
from tests.conftest import copy_tokenizer, make_hf_model

PROMPT = [1, 17, 42, 99, 7]


def greedy_tokens(path: Path) -> list[int]:
    from effinfer import LLM, SamplingParams

    llm = LLM(str(path), dtype="float32", show_progress=False)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return out[0].outputs[0].token_ids


def write_float_copy(src: Path, dst: Path, dequantized: dict[str, torch.Tensor]) -> Path:
    """``src`` with each quantized Linear replaced by its float weight and no quantization_config."""
    tensors = load_file(str(src / "model.safetensors"))
    floats = {k: v for k, v in tensors.items() if v.dtype.is_floating_point and k.count(".weight.") == 0}
    floats = {
        k: v
        for k, v in floats.items()
        if not k.endswith((".SCB", ".quant_map", ".nested_absmax", ".nested_quant_map"))
    }
    floats.update(dequantized)
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in floats.items()}, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    _, path = make_hf_model("LlamaForCausalLM", tmp_path_factory.mktemp("bnb") / "src")
    return path


def bnb_checkpoint(source: Path, out: Path, **config) -> Path:
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    import transformers

    quant = transformers.BitsAndBytesConfig(**config)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=quant)
    model.save_pretrained(out)
    copy_tokenizer(out)
    return out


def test_real_bitsandbytes_nf4_checkpoint_loads_and_matches_dequantized(source, tmp_path):
    from bitsandbytes.functional import dequantize_blockwise, quantize_4bit

    path = bnb_checkpoint(
        source, tmp_path / "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    tensors = load_file(str(path / "model.safetensors"))
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in tensors)
    # The reference: bitsandbytes' quantization of every source Linear (what transformers stored),
    # decoded as documented: quant_map[code] * absmax of the flattened block. (bitsandbytes' own CPU
    # dequantize_4bit kernel gives other values for 64x160 weights, so it is not used here.)
    source_tensors = load_file(str(source / "model.safetensors"))
    dequantized = {}
    for name in [k[: -len(".absmax")] for k in tensors if k.endswith(".weight.absmax")]:
        packed, state = quantize_4bit(
            source_tensors[name], blocksize=64, quant_type="nf4", compress_statistics=True
        )
        assert torch.equal(packed.reshape(-1), tensors[name].reshape(-1))
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        flat = packed.reshape(-1)
        codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1).long()
        values = (state.code[codes].view(-1, 64) * absmax[:, None]).reshape(-1)
        dequantized[name] = values[: state.shape.numel()].view(state.shape)
    reference = write_float_copy(path, tmp_path / "float", dequantized)

    from effinfer import LLM

    llm = LLM(str(path), dtype="float32", show_progress=False)
    layer = llm.engine.runner.model.model.layers[1]
    q_rows = layer.self_attn.qkv_proj.shard_sizes[0]
    assert layer.self_attn.qkv_proj.quantized.quant_type == "nf4"
    assert layer.self_attn.qkv_proj.quantized.double_quant
    assert torch.equal(
        layer.self_attn.qkv_proj.quantized.dequantize()[:q_rows],
        dequantized["model.layers.1.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        layer.mlp.down_proj.quantized.dequantize(), dequantized["model.layers.1.mlp.down_proj.weight"]
    )
    del llm
    assert greedy_tokens(path) == greedy_tokens(reference)


def test_real_bitsandbytes_int8_checkpoint_loads(source, tmp_path):
    path = bnb_checkpoint(source, tmp_path / "int8", load_in_8bit=True)
    tensors = load_file(str(path / "model.safetensors"))
    from effinfer import LLM

    llm = LLM(str(path), dtype="float32", show_progress=False)
    down = llm.engine.runner.model.model.layers[0].mlp.down_proj.quantized
    assert isinstance(down, LLMInt8Weight)
    assert torch.equal(down.weight, tensors["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(down.absmax, tensors["model.layers.0.mlp.down_proj.SCB"])
    # The loaded layer multiplies as bitsandbytes' own LLM.int8() does on the checkpoint's codes.
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, down.in_features, generator=g).clamp(-4, 4)
    x[:, 5] = 7 + 10 * torch.rand(3, generator=g)  # an outlier column: above 6 in every token
    x = x.half().float()
    state = bnb.MatmulLtState()
    state.CB, state.SCB, state.has_fp16_weights, state.is_training = down.weight, down.absmax, False, False
    with torch.no_grad():
        theirs = bnb.matmul(x.half(), down.weight, state=state, threshold=6.0).float()
        ours = llm.engine.runner.model.model.layers[0].mlp.down_proj(x)
    del llm
    # Same int8 operands; bitsandbytes rounds to fp16 three times (see test_llm_int8.py).
    bound = 3 * 2.0**-11 * (x.abs() @ down.dequantize().abs().t())
    assert ((ours - theirs).abs() <= bound).all(), ((ours - theirs).abs() / bound).max()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_written_checkpoint_reads_back_in_bitsandbytes_layout(source, tmp_path, quant_type, double_quant):
    from effinfer.compress.quant.formats import save_quantized
    from effinfer.compress.quant.nf4 import quantize_model_nf4
    from effinfer.config import ModelConfig
    from effinfer.loading.safetensors import load_model

    model = load_model(
        source, ModelConfig.from_dir(source), torch.float32, torch.device("cpu"), 64, False, False
    )
    quantize_model_nf4(model, quant_type, 64, double_quant)
    out = save_quantized(model, source, source, tmp_path / "q", format="bitsandbytes")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"]
    assert config["bnb_4bit_quant_type"] == quant_type and config["bnb_4bit_use_double_quant"] == double_quant
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    assert (
        tensors[name].dtype == torch.uint8 and (name + ".quant_state.bitsandbytes__" + quant_type) in tensors
    )
    assert (name + ".nested_absmax" in tensors) == double_quant
    qkv = model.model.layers[0].self_attn.qkv_proj
    q_rows, k_rows, _ = qkv.shard_sizes
    expected = qkv.quantized.dequantize()[q_rows : q_rows + k_rows]
    functional = pytest.importorskip("bitsandbytes.functional")
    parts = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
    state = functional.QuantState.from_dict(parts, torch.device("cpu"))
    state.dtype = torch.float32  # the file names bfloat16 (the compute dtype); compare in float32
    assert torch.equal(functional.dequantize_4bit(tensors[name], state).float(), expected)
    # And effinfer reads its own output back to the same weights.
    from effinfer import LLM

    llm = LLM(str(out), dtype="float32", show_progress=False)
    assert torch.equal(
        llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.quantized.dequantize(),
        qkv.quantized.dequantize(),
    )
