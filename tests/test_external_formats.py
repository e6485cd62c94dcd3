"""effinfer reads GPTQ and AWQ layers exactly as the tools that write them lay them out.

Where AutoGPTQ (its v1 ``QuantLinear.pack``) and AutoAWQ (``WQLinear_GEMM.from_linear``) are
installed, they pack the tensors here and their own CPU readers dequantize them too. Without them,
words built by hand from the published layouts stand in (worked examples), so the reader is
always checked against something other than effinfer's own writer. compressed-tensors (the
llm-compressor format) is checked against its library in test_quant_formats.py and here by a
worked example.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from effinfer.loading import quant_formats as qf

FLOAT32_EPS = 2.0**-24  # unit roundoff


def as_int32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def random_codes(out_f: int, in_f: int, bits: int, group: int, seed: int):
    """Codes, zero points in [1, 2**bits) (AutoGPTQ v1 cannot store a zero of 0) and fp16-exact scales."""
    g = torch.Generator().manual_seed(seed)
    groups = in_f // group
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    zeros = torch.randint(1, 2**bits, (out_f, groups), generator=g)
    scales = (torch.rand(out_f, groups, generator=g) * 0.05 + 0.005).half().float()
    return codes, zeros, scales


def spec_dequantize(codes, zeros, scales, group: int) -> torch.Tensor:
    """W = (q - z) * s, the definition both tools document, each input column in group column // group."""
    return (codes - zeros.repeat_interleave(group, 1)).float() * scales.repeat_interleave(group, 1)


def assert_matmul_close(
    ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> None:
    """Two float32 dot products over the same exact weights differ by at most 2·n·u·Σ|x||w| (Higham)."""
    bound = 2 * x.shape[-1] * FLOAT32_EPS * (x.abs() @ weight.abs().t())
    assert ((ours - theirs).abs() <= bound + 1e-30).all(), (ours - theirs).abs().max()


# ---- AutoGPTQ ----------------------------------------------------------------------------------


def autogptq_quant_linear():
    """AutoGPTQ's "cuda-old" QuantLinear, loaded from its file so that the package's model zoo
    (peft, datasets, ...) need not import; its pack() and CPU forward are plain torch/numpy."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or spec.origin is None:
        pytest.skip("auto-gptq is not installed")
    path = Path(spec.origin).parent / "nn_modules" / "qlinear" / "qlinear_cuda_old.py"
    module_spec = importlib.util.spec_from_file_location("_autogptq_qlinear_cuda_old", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.QuantLinear


@pytest.mark.parametrize("bits, group", [(2, 32), (3, 32), (4, 32), (4, -1), (8, 64)])
def test_autogptq_packed_layer_reads_back(bits, group):
    QuantLinear = autogptq_quant_linear()
    out_f, in_f = 64, 128
    group_cols = in_f if group == -1 else group
    codes, zeros, scales = random_codes(out_f, in_f, bits, group_cols, seed=bits)
    weight = spec_dequantize(codes, zeros, scales, group_cols)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = weight.clone()
    layer = QuantLinear(bits, group, in_f, out_f, bias=False, weight_dtype=torch.float32)
    g_idx = torch.arange(in_f, dtype=torch.int32) // group_cols
    layer.pack(linear, scales.clone(), zeros.float().clone(), g_idx)
    tensors = {
        "qweight": layer.qweight,
        "qzeros": layer.qzeros,
        "scales": layer.scales.half(),  # checkpoints store fp16; the scales are fp16-exact
        "g_idx": layer.g_idx,
    }
    ours = qf.unpack_gptq(tensors, bits, group, "gptq")
    assert torch.equal(ours.qweight.long(), codes)
    assert torch.equal(ours.zeros.long(), zeros)
    assert torch.equal(ours.dequantize(), weight)

    # AutoGPTQ's own reader (its CPU forward unpacks and dequantizes in torch) on the same words.
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = layer(x)
    assert_matmul_close(ours.reference_linear(x, None), theirs, x, weight)


# ---- AutoAWQ -----------------------------------------------------------------------------------


def autoawq_modules():
    """AutoAWQ's GEMM layer and its reader ``dequantize_gemm``, imported without ``awq/__init__``
    (which loads the model zoo and needs ``datasets``); the stubs are removed afterwards."""
    spec = importlib.util.find_spec("awq")
    if spec is None or spec.origin is None:
        pytest.skip("autoawq is not installed")
    root = Path(spec.origin).parent
    saved = {k: v for k, v in sys.modules.items() if k == "awq" or k.startswith("awq.")}
    for name, sub in (("awq", ""), ("awq.modules", "modules"), ("awq.modules.linear", "modules/linear")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(root / sub)]
        sys.modules[name] = stub
    try:
        gemm = importlib.import_module("awq.modules.linear.gemm")
        packing = importlib.import_module("awq.utils.packing_utils")
    finally:
        for name in [k for k in sys.modules if k == "awq" or k.startswith("awq.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return gemm.WQLinear_GEMM, packing.dequantize_gemm


@pytest.mark.parametrize("group", [32, 128])
def test_autoawq_packed_layer_reads_back(group):
    WQLinear_GEMM, dequantize_gemm = autoawq_modules()
    out_f, in_f = 64, 128  # AutoAWQ sizes qweight as out // 32 * 4 words: out must be a multiple of 32
    codes, zeros, scales = random_codes(out_f, in_f, 4, group, seed=group)
    weight = spec_dequantize(codes, zeros, scales, group)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = weight.clone()
    # AutoAWQ takes scales and zeros as [groups, out].
    layer = WQLinear_GEMM.from_linear(
        linear, 4, group, scales=scales.t().contiguous(), zeros=zeros.t().contiguous()
    )
    tensors = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales}
    ours = qf.unpack_awq(tensors, 4, group)
    assert torch.equal(ours.qweight.long(), codes)
    assert torch.equal(ours.zeros.long(), zeros)
    assert torch.equal(ours.dequantize(), weight)
    # AutoAWQ's reader computes (q - z) * s in fp16: the exact product rounded once, as ours cast to fp16.
    theirs = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, group)  # [in, out]
    assert torch.equal(ours.dequantize().t().half(), theirs)


# ---- whole checkpoints packed by the libraries --------------------------------------------------

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def rtn_codes(weight: torch.Tensor, group: int):
    """Asymmetric 4-bit min-max codes per group of inputs, zeros in [1, 15], fp16-exact scales."""
    out_f, in_f = weight.shape
    w = weight.reshape(out_f, in_f // group, group)
    low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-4).half().float()
    zeros = torch.round(-low / scales).clamp(1, 15)
    codes = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return codes.reshape(out_f, in_f).long(), zeros.long(), scales


@pytest.mark.parametrize("tool", ["auto-gptq", "autoawq"])
def test_checkpoint_packed_by_the_tool_gives_the_dequantized_models_logits(tool, tmp_path):
    """Every decoder Linear of a tiny Llama packed by the tool into a checkpoint with the
    quantization_config it writes; effinfer must give the logits of the float model that holds
    the dequantized weights (float32 throughout, so to the 1e-4 of test_models_vs_hf)."""
    from safetensors.torch import load_file, save_file

    from effinfer import LLM
    from tests.conftest import make_hf_model

    pack_layer = autogptq_quant_linear() if tool == "auto-gptq" else autoawq_modules()[0]
    group = 32
    # 4 KV heads: AutoGPTQ and AutoAWQ size qzeros as out // 32 words, so every output must be a multiple of 32.
    hf, src = make_hf_model("LlamaForCausalLM", tmp_path / "src", num_key_value_heads=4)
    tensors = load_file(str(src / "model.safetensors"))
    packed = {}
    for name in [k for k in tensors if k.endswith(".weight") and any(f".{n}." in k for n in LINEARS)]:
        prefix = name[: -len(".weight")]
        codes, zeros, scales = rtn_codes(tensors[name].float(), group)
        weight = spec_dequantize(codes, zeros, scales, group)
        tensors[name] = weight  # the float model the checkpoint stands for
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data = weight.clone()
        if tool == "auto-gptq":
            layer = pack_layer(
                4, group, weight.shape[1], weight.shape[0], bias=False, weight_dtype=torch.float32
            )
            layer.pack(linear, scales.clone(), zeros.float(), torch.arange(weight.shape[1]) // group)
            parts = {
                "qweight": layer.qweight,
                "qzeros": layer.qzeros,
                "scales": layer.scales.half(),
                "g_idx": layer.g_idx,
            }
        else:
            layer = pack_layer.from_linear(
                linear, 4, group, scales=scales.t().contiguous(), zeros=zeros.t().contiguous()
            )
            parts = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales}
        packed.update({f"{prefix}.{key}": value.contiguous() for key, value in parts.items()})
    assert len(packed) == len(LINEARS) * hf.config.num_hidden_layers * (4 if tool == "auto-gptq" else 3)

    quantized_dir = tmp_path / "quantized"
    shutil.copytree(src, quantized_dir)
    rest = {k: v for k, v in tensors.items() if not any(f".{n}." in k for n in LINEARS)}
    save_file({**rest, **packed}, str(quantized_dir / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if tool == "auto-gptq":  # the fields AutoGPTQ's BaseQuantizeConfig writes
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group,
                                         "desc_act": False, "sym": False, "checkpoint_format": "gptq"}  # fmt: skip
    else:  # and AutoAWQ's
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                         "zero_point": True, "version": "gemm"}  # fmt: skip
    (quantized_dir / "config.json").write_text(json.dumps(config))

    hf.load_state_dict(tensors)
    prompt = torch.tensor([[1, 17, 99, 305, 42, 7, 300, 11]])
    with torch.no_grad():
        expected = hf(prompt).logits[0]
        model = LLM(str(quantized_dir), dtype="float32", show_progress=False).engine.runner.model
        assert model.model.layers[0].mlp.down_proj.quantized is not None  # read as packed, not as float
        ours = model.compute_logits(model.forward_dense(prompt))[0].float()
    assert (ours - expected).abs().max().item() < 1e-4


# ---- worked examples from the published layouts (no library needed) ---------------------------


def test_gptq_v1_worked_example():
    """Two output columns, eight inputs, 4 bits, one group.

    qweight is [in/8, out]: word n holds the codes of output column n, input i in bits 4i..4i+3.
    qzeros is [groups, out/8]: output column n in bits 4n..4n+3, holding zero - 1 (AutoGPTQ v1).
    """
    qweight = torch.tensor([[as_int32(0x87654321), as_int32(0xFFFFFFFF)]], dtype=torch.int32)
    qzeros = torch.tensor([[0x07]], dtype=torch.int32)  # column 0: zero 8; column 1: zero 0 + 1 = 1
    scales = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    tensors = {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scales,
        "g_idx": torch.zeros(8, dtype=torch.int32),
    }
    weight = qf.unpack_gptq(tensors, 4, -1, "gptq").dequantize()
    expected = torch.tensor(
        [
            [-3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0],  # (1..8 - 8) * 0.5
            [28.0] * 8,  # (15 - 1) * 2
        ]
    )
    assert torch.equal(weight, expected)
    # gptq_v2 stores the zero itself: the same weights from zeros 8 and 1.
    v2 = dict(tensors, qzeros=torch.tensor([[0x18]], dtype=torch.int32))
    assert torch.equal(qf.unpack_gptq(v2, 4, -1, "gptq_v2").dequantize(), expected)


def test_gptq_v1_stored_all_ones_is_zero_point_zero():
    # AutoGPTQ's reader adds one and masks to the width, so a stored 0xF means a zero point of 0.
    tensors = {
        "qweight": torch.tensor([[0x00000003]], dtype=torch.int32),  # input 0: code 3, the rest 0
        "qzeros": torch.tensor([[0x0F]], dtype=torch.int32),
        "scales": torch.tensor([[0.25]], dtype=torch.float16),
    }
    weight = qf.unpack_gptq(tensors, 4, -1, "gptq").dequantize()
    assert weight.tolist() == [[0.75] + [0.0] * 7]


def test_gptq_8bit_and_grouped_worked_example():
    """8 bits: four codes per word. 8 inputs in two groups of 4, one output column."""
    qweight = torch.tensor([[0x04030201], [as_int32(0x807F0A00)]], dtype=torch.int32)
    qzeros = torch.tensor([[127], [0]], dtype=torch.int32)  # zeros 128 and 1
    scales = torch.tensor([[1.0], [0.5]], dtype=torch.float16)
    g_idx = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32)
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    weight = qf.unpack_gptq(tensors, 8, 4, "gptq").dequantize()
    # group 0: codes 1..4 minus 128; group 1: codes 0x00, 0x0A, 0x7F, 0x80 minus 1, times 0.5
    assert weight.tolist() == [[-127.0, -126.0, -125.0, -124.0, -0.5, 4.5, 63.0, 63.5]]


def test_awq_gemm_worked_example():
    """One input row, eight output columns. qweight is [in, out/8]: nibble i of a word holds output
    column 8w + [0, 2, 4, 6, 1, 3, 5, 7][i]; qzeros use the same order; scales are [groups, out]."""
    # Output column j gets code j: the nibbles, lowest first, are 0 2 4 6 1 3 5 7.
    qweight = torch.tensor([[0x75316420]], dtype=torch.int32)
    # Zeros 8 for even columns, 1 for odd ones: nibbles 8 8 8 8 1 1 1 1.
    qzeros = torch.tensor([[0x11118888]], dtype=torch.int32)
    scales = torch.tensor([[1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 2.0, 2.0]], dtype=torch.float16)
    weight = qf.unpack_awq({"qweight": qweight, "qzeros": qzeros, "scales": scales}, 4, 1).dequantize()
    # column j: (j - zero_j) * scale_j
    assert weight[:, 0].tolist() == [-8.0, 0.0, -3.0, 1.0, -1.0, 1.0, -4.0, 12.0]


def test_compressed_tensors_pack_quantized_worked_example():
    """llm-compressor's "pack-quantized": signed codes q in [-8, 7] stored as q + 8, eight to an int32
    along the input dimension (lowest bits first), weight_scale [out, groups], weight_shape [out, in]."""
    tensors = {
        "weight_packed": torch.tensor([[as_int32(0x87654321)], [as_int32(0x0F0F0F0F)]], dtype=torch.int32),
        "weight_scale": torch.tensor([[0.5], [0.25]], dtype=torch.bfloat16),
        "weight_shape": torch.tensor([2, 8]),
    }
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8}
    weight = qf.unpack_compressed_tensors(tensors, args).dequantize()
    assert weight.tolist() == [
        [-3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0],  # stored 1..8, q = -7..0, times 0.5
        [1.75, -2.0] * 4,  # stored 15 and 0: q = 7 and -8, times 0.25
    ]
    # "int-quantized" stores the signed 8-bit codes as they are, one per int8.
    int8 = {
        "weight": torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8),
        "weight_scale": torch.tensor([[0.5]]),
    }
    args8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert qf.unpack_compressed_tensors(int8, args8).dequantize().tolist() == [[-64.0, -0.5, 0.0, 63.5]]
