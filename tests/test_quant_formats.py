"""Quantized checkpoint formats: GPTQ, AWQ GEMM and compressed-tensors, packed, written and loaded.

Layouts are checked against hand-computed words and an independent big-integer packer written
from the formats' documentation; compressed-tensors also against the library itself (when
installed); whole checkpoints by loading them back into ``LLM`` and into transformers.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from effinfer.compress.quant.formats import save_quantized
from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.linear import quantizable_linears
from effinfer.loading import quant_formats as qf
from effinfer.loading.safetensors import load_model
from effinfer.quant.integer import QuantizedWeight, quantize_rtn
from tests.conftest import make_hf_model

CPU = torch.device("cpu")


def as_int32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def reference_pack(values: list[int], bits: int) -> list[int]:
    """Documented layout: value i at bits [i*bits, (i+1)*bits) of one long little-endian bit string."""
    stream = sum(int(v) << (bits * i) for i, v in enumerate(values))
    num_words = -(-len(values) * bits // 32)
    return [as_int32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(num_words)]


def random_weight(out_f, in_f, bits, group, symmetric, act_order=False, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = -(-in_f // group)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, groups, generator=g) * 0.1 + 0.01).half().float()  # fp16-exact
    if symmetric:
        zeros = torch.full((out_f, groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, 2**bits, (out_f, groups), generator=g).to(torch.int32)
    g_idx = None
    if act_order:  # GPTQ desc_act: groups follow a permutation of the columns
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // group).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, bits, group, g_idx)


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert (a.bits, a.in_features, a.out_features) == (b.bits, b.in_features, b.out_features)
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.group_index(), b.group_index())
    assert torch.equal(a.dequantize(), b.dequantize())


# ---- layouts: hand-computed words --------------------------------------------------------------


def test_gptq_words_by_hand():
    # 8 input columns of one output column, codes 1..8: packed along the input dim, low bits first.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    zeros = torch.tensor([[8]], dtype=torch.int32)
    qw = QuantizedWeight(codes, torch.ones(1, 1), zeros, 4, 8)
    t = qf.pack_gptq(qw)
    assert t["qweight"].tolist() == [[as_int32(0x87654321)]]
    assert t["qweight"].dtype == torch.int32
    # qzeros hold zero - 1 = 7 in the lowest nibble (one output column).
    assert t["qzeros"].tolist() == [[7]]
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (1, 1)
    assert t["g_idx"].tolist() == [0] * 8
    # 8 bits: four codes per word.
    qw8 = QuantizedWeight(
        torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), torch.ones(1, 1), zeros + 120, 8, 4
    )
    t8 = qf.pack_gptq(qw8)
    assert t8["qweight"].tolist() == [[0x04030201]]
    assert t8["qzeros"].tolist() == [[127]]


def test_gptq_qzeros_packed_along_output():
    out_f = 8
    zeros = torch.arange(1, 9, dtype=torch.int32)[:, None]  # zero of output row r is r + 1
    qw = QuantizedWeight(torch.zeros(out_f, 8, dtype=torch.uint8) + 9, torch.ones(out_f, 1), zeros, 4, 8)
    # stored zero - 1 = r: nibble r holds r
    assert qf.pack_gptq(qw)["qzeros"].tolist() == [[as_int32(0x76543210)]]


def test_gptq_3bit_matches_reference_stream():
    qw = random_weight(4, 64, 3, 32, symmetric=False, seed=3)
    t = qf.pack_gptq(qw)
    assert t["qweight"].shape == (6, 4)  # 64 * 3 / 32 words per output column
    for n in range(4):
        assert t["qweight"][:, n].tolist() == reference_pack(qw.qweight[n].tolist(), 3)
    for g in range(2):
        assert t["qzeros"][g].tolist() == reference_pack((qw.zeros[:, g] - 1).tolist(), 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_matches_reference_stream(bits):
    qw = random_weight(16, 64, bits, 16, symmetric=False, seed=bits)
    t = qf.pack_gptq(qw)
    for n in range(16):
        assert t["qweight"][:, n].tolist() == reference_pack(qw.qweight[n].tolist(), bits)
    for g in range(4):
        assert t["qzeros"][g].tolist() == reference_pack((qw.zeros[:, g] - 1).tolist(), bits)
    assert torch.equal(t["scales"], qw.scales.t().half())


def test_awq_words_by_hand():
    # One input row, output columns 0..7 with codes 0..7: AWQ puts column order[i] in nibble i.
    codes = torch.arange(8, dtype=torch.uint8)[:, None]  # [out=8, in=1]
    zeros = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8]], dtype=torch.int32)
    qw = QuantizedWeight(codes, torch.ones(8, 1), zeros, 4, 1)
    t = qf.pack_awq(qw)
    assert t["qweight"].tolist() == [[0x75316420]]  # nibbles: 0 2 4 6 1 3 5 7
    assert t["qzeros"].tolist() == [[as_int32(0x86427531)]]  # zeros 1 3 5 7 2 4 6 8
    assert t["scales"].shape == (1, 8)


def test_awq_matches_reference_stream():
    qw = random_weight(24, 64, 4, 32, symmetric=False, seed=5)
    t = qf.pack_awq(qw)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for k in range(64):
        row = qw.qweight[:, k].tolist()
        interleaved = [row[8 * b + order[i]] for b in range(3) for i in range(8)]
        assert t["qweight"][k].tolist() == reference_pack(interleaved, 4)
    for g in range(2):
        row = qw.zeros[:, g].tolist()
        assert t["qzeros"][g].tolist() == reference_pack(
            [row[8 * b + order[i]] for b in range(3) for i in range(8)], 4
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_matches_reference_stream(bits):
    qw = random_weight(16, 96, bits, 32, symmetric=False, seed=7)
    t = qf.pack_compressed_tensors(qw)
    assert t["weight_shape"].tolist() == [16, 96]
    for n in range(16):
        assert t["weight_packed"][n].tolist() == reference_pack(qw.qweight[n].tolist(), bits)
    for g in range(3):  # zero points packed along the output dimension
        assert t["weight_zero_point"][:, g].tolist() == reference_pack(qw.zeros[:, g].tolist(), bits)
    sym = qf.pack_compressed_tensors(random_weight(16, 96, bits, 32, symmetric=True))
    assert "weight_zero_point" not in sym
    w8 = qf.pack_compressed_tensors(random_weight(4, 8, 8, 8, symmetric=True), "int-quantized")
    assert w8["weight"].dtype == torch.int8


# ---- round trips -------------------------------------------------------------------------------

CASES = [
    # (out, in, bits, group, symmetric, act_order)
    (32, 64, 4, 32, True, False),
    (32, 64, 4, 32, False, False),
    (172, 64, 4, 16, False, False),  # 172 outputs: qzeros / AWQ words padded
    (64, 172, 4, 64, False, False),  # 172 inputs: shorter last group, padded qweight
    (64, 172, 4, 172, True, False),  # per-channel
    (40, 128, 4, 32, False, True),  # act-order
    (40, 128, 8, 32, True, True),
    (16, 64, 8, 64, False, False),
    (16, 96, 3, 32, False, True),
    (16, 64, 2, 16, True, False),
]


@pytest.mark.parametrize("case", CASES)
def test_gptq_round_trip(case):
    out_f, in_f, bits, group, sym, act = case
    qw = random_weight(out_f, in_f, bits, group, sym, act)
    config_group = -1 if group >= in_f else group
    for fmt in ("gptq", "gptq_v2"):
        assert_same(qf.unpack_gptq(qf.pack_gptq(qw, fmt), bits, config_group, fmt), qw)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == 4 and not c[5]])
def test_awq_round_trip(case):
    out_f, in_f, bits, group, sym, _ = case
    qw = random_weight(out_f, in_f, bits, group, sym)
    assert_same(qf.unpack_awq(qf.pack_awq(qw), bits, group), qw)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] != 3])
def test_compressed_tensors_round_trip(case):
    out_f, in_f, bits, group, sym, act = case
    qw = random_weight(out_f, in_f, bits, group, sym, act)
    args = qf.compressed_tensors_args(qw)
    assert_same(qf.unpack_compressed_tensors(qf.pack_compressed_tensors(qw), args), qw)
    if bits == 8:
        assert_same(qf.unpack_compressed_tensors(qf.pack_compressed_tensors(qw, "int-quantized"), args), qw)


def test_gptq_v1_zero_point_zero():
    qw = random_weight(8, 32, 4, 16, symmetric=False)
    qw.zeros[0, 0] = 0
    qw.qweight[0, :16] = qw.qweight[0, :16].clamp(max=14)
    back = qf.unpack_gptq(qf.pack_gptq(qw), 4, 16)
    assert torch.equal(back.dequantize(), qw.dequantize())  # codes and zero shifted by one
    assert int(back.zeros.min()) >= 1
    qw.qweight[0, 3] = 15
    with pytest.raises(ValueError, match="zero point of 0"):
        qf.pack_gptq(qw)


def test_formats_refuse_what_they_cannot_store():
    with pytest.raises(ValueError, match="AWQ GEMM cannot store 8-bit"):
        qf.pack_awq(random_weight(8, 32, 8, 32, True))
    with pytest.raises(ValueError, match="act-order"):
        qf.pack_awq(random_weight(8, 32, 4, 16, False, act_order=True))
    with pytest.raises(ValueError, match="3-bit"):
        qf.pack_compressed_tensors(random_weight(8, 32, 3, 32, False))


# ---- compressed-tensors, the library itself ----------------------------------------------------


def ct_scheme(bits: int, group: int | None, symmetric: bool, w8a8: bool = False):
    ct = pytest.importorskip("compressed_tensors.quantization")
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric}
    weights.update({"strategy": "group", "group_size": group} if group else {"strategy": "channel"})
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return ct.QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=acts if w8a8 else None
    )


@pytest.mark.parametrize(
    "bits,group,symmetric", [(4, 32, True), (4, 32, False), (8, None, True), (4, None, False)]
)
def test_compressed_tensors_library_compresses_effinfer_reads(bits, group, symmetric):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    scheme = ct_scheme(bits, group, symmetric)
    g = torch.Generator().manual_seed(1)
    out_f, in_f = 48, 96
    w = torch.randn(out_f, in_f, generator=g).half()
    groups = in_f // group if group else 1
    scale = (torch.rand(out_f, groups, generator=g) * 0.3 + 0.05).half()
    state = {"weight": w, "weight_scale": scale}
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-3, 4, (out_f, groups), generator=g).to(torch.int8)
    packed = PackedQuantizationCompressor.compress(state, scheme)
    theirs = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    ours = qf.unpack_compressed_tensors(packed, scheme.weights.model_dump())
    assert ours.bits == bits and ours.num_groups == groups
    assert torch.equal(ours.dequantize().half(), theirs)


def test_compressed_tensors_library_int8_w8a8():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor

    scheme = ct_scheme(8, None, True, w8a8=True)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)).half()
    scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).half()
    packed = IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    theirs = IntQuantizationCompressor.decompress(packed, scheme)["weight"]
    ours = qf.unpack_compressed_tensors(packed, scheme.weights.model_dump())
    assert ours.symmetric and ours.num_groups == 1
    assert torch.equal(ours.dequantize().half(), theirs)
    assert qf.compressed_tensors_act_quant(scheme.input_activations.model_dump()) == "int8"


# ---- whole checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant_formats") / "src"
    path.mkdir()
    make_hf_model("LlamaForCausalLM", path)
    return path


def quantized_model(path, bits, group, symmetric, act_quant=None):
    """The checkpoint at ``path`` with every decoder Linear RTN-quantized, scales rounded to fp16
    (what GPTQ / AWQ store), so the saved model is exactly the one in memory."""
    config = ModelConfig.from_dir(path)
    model = load_model(path, config, torch.float32, CPU, 128, show_progress=False, finalize=False)
    for _, linear in quantizable_linears(model):
        qw = quantize_rtn(linear.weight.data, bits, group, symmetric)
        qw.scales = qw.scales.half().float()
        linear.set_quantized(qw, act_quant)
    return model, config


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            hidden = model.forward_dense(torch.tensor([ids]))
            ids.append(int(model.compute_logits(hidden[0, -1:]).argmax()))
    return ids[len(prompt) :]


PROMPT = [1, 45, 300, 22, 7, 101]


@pytest.mark.parametrize(
    "fmt,bits,group,symmetric",
    [
        ("gptq", 4, 32, True),
        ("gptq", 8, None, False),
        ("awq", 4, 32, False),
        ("compressed-tensors", 4, 32, False),
    ],
)
def test_save_load_end_to_end(tiny_model, tmp_path, fmt, bits, group, symmetric):
    from effinfer import LLM, SamplingParams

    model, config = quantized_model(tiny_model, bits, group, symmetric)
    out = save_quantized(model, tiny_model, tiny_model, tmp_path / fmt, fmt, {"method": "rtn"})
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == fmt and quant["effinfer"] == {"method": "rtn"}
    assert (out / "tokenizer.json").is_file()

    loaded = load_model(out, config, torch.float32, CPU, 128, show_progress=False, finalize=False)
    pairs = dict(quantizable_linears(loaded))
    for name, linear in quantizable_linears(model):
        assert pairs[name].quantized is not None and pairs[name].weight.numel() == 0
        assert torch.equal(pairs[name].quantized.dequantize(), linear.quantized.dequantize()), name
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = model.compute_logits(model.forward_dense(ids))  # fp32 dequantize-then-matmul
        got = loaded.compute_logits(loaded.forward_dense(ids))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    llm = LLM(out, dtype="float32", show_progress=False, kv_cache_memory=1 << 22)
    result = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert result[0].outputs[0].token_ids == greedy(model, PROMPT, 8)


def test_compressed_tensors_checkpoint_decompressed_by_library(tiny_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model, _ = quantized_model(tiny_model, 4, 32, symmetric=False)
    out = save_quantized(model, tiny_model, tiny_model, tmp_path / "ct", "compressed-tensors")
    config = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    scheme = config.config_groups["group_0"]
    tensors = load_file(str(out / "model.safetensors"))
    layer = model.model.layers[1]
    for hf_name, (linear, start, stop) in {
        "self_attn.k_proj": (layer.self_attn.qkv_proj, 64, 80),
        "mlp.up_proj": (layer.mlp.gate_up_proj, 160, 320),
        "mlp.down_proj": (layer.mlp.down_proj, 0, 64),
    }.items():
        prefix = f"model.layers.1.{hf_name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        ours = linear.quantized.rows(start, stop).dequantize().half()
        assert torch.equal(theirs, ours), hf_name


def test_compressed_tensors_checkpoint_loads_in_transformers(tiny_model, tmp_path):
    """The whole symmetric checkpoint through transformers' compressed-tensors integration."""
    pytest.importorskip("compressed_tensors")
    import transformers

    model, _ = quantized_model(tiny_model, 4, 32, symmetric=True)
    out = save_quantized(model, tiny_model, tiny_model, tmp_path / "ct", "compressed-tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        theirs = hf(ids).logits[0]
        ours = model.compute_logits(model.forward_dense(ids))[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_w8a8_compressed_tensors(tiny_model, tmp_path):
    model, config = quantized_model(tiny_model, 8, None, True, act_quant="int8")
    out = save_quantized(model, tiny_model, tiny_model, tmp_path / "w8a8", "compressed-tensors")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "int-quantized"
    assert quant["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    loaded = load_model(out, config, torch.float32, CPU, 128, show_progress=False, finalize=False)
    linear = loaded.model.layers[0].mlp.down_proj
    assert linear.act_quant == "int8" and linear.quantized.bits == 8 and linear.quantized.symmetric
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.compute_logits(loaded.forward_dense(ids)), model.compute_logits(model.forward_dense(ids))
        )
    with pytest.raises(ValueError, match="weight-only"):
        save_quantized(model, tiny_model, tiny_model, tmp_path / "g", "gptq")
    if importlib.util.find_spec("effinfer.kernels.w8a8") is not None:  # the int8 GEMM backend
        from effinfer import LLM, SamplingParams

        llm = LLM(out, dtype="float32", show_progress=False, kv_cache_memory=1 << 22)
        result = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert result[0].outputs[0].token_ids == greedy(model, PROMPT, 8)


def test_save_refuses_inexpressible(tiny_model, tmp_path):
    model, _ = quantized_model(tiny_model, 8, 32, symmetric=True)
    with pytest.raises(ValueError, match="4-bit"):
        save_quantized(model, tiny_model, tiny_model, tmp_path / "awq", "awq")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save_quantized(model, tiny_model, tiny_model, tmp_path / "x", "exl2")


def test_unknown_quant_method_is_a_clear_error(tiny_model, tmp_path):
    model, config = quantized_model(tiny_model, 4, 32, symmetric=True)
    out = save_quantized(model, tiny_model, tiny_model, tmp_path / "q", "gptq")
    hf = json.loads((out / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="'hqq'.*gptq, awq, compressed-tensors, bitsandbytes"):
        load_model(out, config, torch.float32, CPU, 128, show_progress=False)
    hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="gemv"):
        load_model(out, config, torch.float32, CPU, 128, show_progress=False)


def test_stories260k_gptq_ragged_groups(stories260k, tmp_path):
    """stories260K's 172-wide MLP: a shorter last group and words padded past 172 codes."""
    from effinfer import LLM, SamplingParams

    model, _ = quantized_model(stories260k, 4, 32, symmetric=False)
    assert model.model.layers[0].mlp.down_proj.quantized.num_groups == 6
    out = save_quantized(model, stories260k, stories260k, tmp_path / "gptq", "gptq")
    llm = LLM(out, dtype="float32", show_progress=False, kv_cache_memory=1 << 22)
    result = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert result[0].outputs[0].token_ids == greedy(model, PROMPT, 8)
