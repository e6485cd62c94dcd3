"""Low-rank factorization: the ``LowRankWeight`` protocol and kernel, truncated SVD against Eckart–Young,
ASVD / SVD-LLM against plain SVD on the output error, rank allocation, and ``effinfer compress
--low-rank`` end to end against a dense transformers model built from the saved factors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from effinfer import LLM, SamplingParams
from effinfer.cli import main as cli_main
from effinfer.compress.lowrank import (
    InputStats,
    LowRankOptions,
    Part,
    Whitening,
    allocate_ranks,
    max_saving_rank,
    truncated_svd,
)
from effinfer.config import ConfigError
from effinfer.kernels import lowrank_linear, quant_linear
from effinfer.kernels.cpu import skinny
from effinfer.layers.linear import Linear
from effinfer.quant import registry
from effinfer.quant.lowrank import LowRankWeight
from tests.conftest import make_hf_model

KV_BYTES = 16 * 2**20


def random_low_rank(out_features: int, in_features: int, rank: int | None, seed: int) -> LowRankWeight:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return LowRankWeight((None,), (torch.randn(out_features, in_features, generator=g),))
    u = torch.randn(out_features, rank, generator=g)
    return LowRankWeight((u,), (torch.randn(rank, in_features, generator=g),))


def fused() -> list[LowRankWeight]:
    """q/k/v-like parts of different ranks, one kept whole."""
    return [random_low_rank(48, 32, 6, 0), random_low_rank(16, 32, 3, 1), random_low_rank(16, 32, None, 2)]


# ---- the weight type ---------------------------------------------------------------------------


def test_dequantize_and_reference_linear_are_u_times_v():
    parts = fused()
    weight = LowRankWeight.cat_rows(parts)
    expected = torch.cat([(p.vs[0] if p.us[0] is None else p.us[0] @ p.vs[0]) for p in parts])
    torch.testing.assert_close(weight.dequantize(), expected)
    x, bias = torch.randn(5, 32), torch.randn(80)
    torch.testing.assert_close(weight.reference_linear(x, bias), x @ expected.T + bias, rtol=1e-5, atol=1e-4)
    assert (weight.out_features, weight.in_features) == (80, 32)
    assert weight.num_parameters() == 6 * (48 + 32) + 3 * (16 + 32) + 16 * 32


def test_rows_and_cat_rows_are_inverse():
    parts = fused()
    weight = LowRankWeight.cat_rows(parts)
    start = 0
    for part in parts:
        piece = weight.rows(start, start + part.out_features)
        assert piece.ranks() == part.ranks()
        torch.testing.assert_close(piece.dequantize(), part.dequantize())
        start += part.out_features
    # A slice across parts (a tensor-parallel shard) keeps exactly those rows.
    torch.testing.assert_close(weight.rows(40, 70).dequantize(), weight.dequantize()[40:70])
    assert weight.rows(3, 3).out_features == 0


def test_state_dict_round_trip_through_the_registry():
    weight = LowRankWeight.cat_rows(fused())
    tensors, metadata = weight.state_dict()
    json.dumps(metadata)  # metadata goes into config.json
    loaded = registry.weight_type(weight.kind).from_state_dict(tensors, metadata)
    assert loaded.ranks() == weight.ranks()
    assert torch.equal(loaded.dequantize(), weight.dequantize())


def test_bad_factors_are_refused():
    with pytest.raises(ValueError, match="does not match"):
        LowRankWeight((torch.zeros(4, 3),), (torch.zeros(2, 8),))
    with pytest.raises(ValueError, match="in_features"):
        LowRankWeight.cat_rows([random_low_rank(4, 8, 2, 0), random_low_rank(4, 16, 2, 0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_kernel_matches_reference(dtype, rows):
    weight = LowRankWeight.cat_rows(fused())
    bias = torch.randn(80)
    state = quant_linear.prepare(weight, bias, None, dtype)
    assert state.backend == "low-rank"  # the registered kernel, not the dequantized fallback
    x = torch.randn(rows, 32).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=0.3)
    torch.testing.assert_close(
        quant_linear.apply(state, x).float(), weight.reference_linear(x, bias).float(), **tol
    )


def test_a_linear_runs_the_two_products_not_the_dense_matrix():
    linear = Linear(32, [48, 16, 16])
    linear.set_quantized(LowRankWeight.cat_rows(fused()))
    linear.finalize()
    assert linear._kernel_state.backend == "low-rank"
    x = torch.randn(3, 32)
    torch.testing.assert_close(linear(x), linear.quantized.reference_linear(x), rtol=1e-5, atol=1e-4)


def test_ranks_are_padded_to_whole_amx_tiles_without_changing_the_product():
    """A rank off a multiple of 32 would send U's product to oneDNN (slow at batch 1): the kernel pads it."""
    if skinny.extension() is None:
        pytest.skip("no AMX skinny kernel on this CPU: ranks are left as they are")
    weight = LowRankWeight.cat_rows([random_low_rank(48, 64, 6, 0), random_low_rank(16, 64, 33, 1)])
    state = lowrank_linear.prepare(weight, None, torch.bfloat16)
    assert [second.weight.shape for _, _, second, _ in state.parts] == [(48, 32), (16, 64)]
    assert state.first.skinny and all(second.skinny for _, _, second, _ in state.parts)
    for (u, v), (start, stop, second, _) in zip(zip(weight.us, weight.vs), state.parts):
        padded_v = state.first.weight[start:stop]
        exact = u.bfloat16().double() @ v.bfloat16().double()
        assert torch.equal(second.weight.double() @ padded_v.double(), exact)
    x = torch.randn(1, 64).bfloat16()
    torch.testing.assert_close(
        lowrank_linear.apply(state, x).float(), weight.reference_linear(x).float(), rtol=3e-2, atol=0.3
    )


# ---- the factorizations ------------------------------------------------------------------------


def test_truncated_svd_at_full_rank_reconstructs():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    u, v = truncated_svd(w, 24)
    torch.testing.assert_close(u @ v, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_truncated_svd_reaches_the_eckart_young_error(rank):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1)).double()
    u, v = truncated_svd(w, rank)
    error = torch.linalg.matrix_norm(w - (u.double() @ v.double())) ** 2
    dropped = torch.linalg.svdvals(w)[rank:].square().sum()
    torch.testing.assert_close(error, dropped, rtol=1e-5, atol=1e-6)


def correlated_activations(tokens: int, width: int, seed: int) -> torch.Tensor:
    """LLM-like inputs: correlated channels, a few with outlier magnitudes."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5
    x = torch.randn(tokens, width, generator=g) @ (torch.eye(width) + 2 * mix)
    x[:, :3] *= 20  # outlier channels
    return x


@pytest.mark.parametrize("method", ["asvd", "svd-llm"])
def test_activation_aware_beats_plain_svd_on_the_output_error(method):
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 48, generator=g), correlated_activations(2048, 48, 4)
    stats = InputStats()
    stats.add(x, method)
    errors = {}
    for name, whitening in (("svd", None), (method, Whitening(method, stats))):
        u, v = truncated_svd(w, 12, whitening)
        errors[name] = float(torch.linalg.matrix_norm(x @ w.T - x @ (u @ v).T))
    assert errors[method] < 0.9 * errors["svd"], errors


def test_svd_llm_drops_exactly_its_whitened_singular_values():
    """SVD-LLM's claim: with X^T X = L L^T, ||WX - W'X||^2 is the sum of the dropped singular values of W L, squared."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(32, 24, generator=g).double(), correlated_activations(512, 24, 6).double()
    stats = InputStats()
    stats.add(x, "svd-llm")
    whitening = Whitening("svd-llm", stats, damp=0)
    u, v = truncated_svd(w, 6, whitening)
    error = torch.linalg.matrix_norm(x @ w.T - x @ (u.double() @ v.double()).T) ** 2 / len(x)
    dropped = torch.linalg.svdvals(w @ torch.linalg.cholesky(x.T @ x / len(x)))[6:].square().sum()
    torch.testing.assert_close(error, dropped, rtol=1e-4, atol=1e-6)


# ---- rank allocation ---------------------------------------------------------------------------


def _parts(shapes, energies):
    parts = []
    for (rows, cols), energy in zip(shapes, energies):
        parts.append(Part(f"p{len(parts)}", Linear(cols, rows), 0, rows, energy=energy))
    return parts


def test_global_allocation_keeps_the_budget_and_favours_concentrated_spectra():
    flat = torch.full((32,), 1 / 32, dtype=torch.float64)
    steep = torch.tensor([0.5**k for k in range(32)], dtype=torch.float64)
    parts = _parts([(32, 64), (32, 64)], [flat, steep / steep.sum()])
    allocate_ranks(parts, 0.4, "global")
    assert sum(p.parameters for p in parts) <= 0.4 * sum(p.dense_parameters for p in parts)
    assert parts[0].rank > parts[1].rank  # the flat spectrum needs many components, the steep one few
    for p in parts:
        assert p.rank is None or p.rank <= max_saving_rank(32, 64)


def test_a_matrix_that_cannot_save_parameters_stays_dense():
    energy = torch.full((2,), 0.5, dtype=torch.float64)
    parts = _parts([(2, 2), (64, 64)], [energy, torch.full((64,), 1 / 64, dtype=torch.float64)])
    assert max_saving_rank(2, 2) == 0  # 1 * (2 + 2) >= 2 * 2
    for allocation in ("global", "uniform"):
        allocate_ranks(parts, 0.5, allocation)
        assert parts[0].rank is None and parts[1].rank is not None


def test_bad_options_are_one_clear_error():
    for ratio in (0, 1, 1.5, -0.2):
        with pytest.raises(ConfigError, match="share of parameters"):
            LowRankOptions(ratio)
    with pytest.raises(ConfigError, match="unknown low-rank method"):
        LowRankOptions(0.5, method="tucker")


# ---- the command, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("lowrank") / "src"
    path.mkdir()
    model, _ = make_hf_model("LlamaForCausalLM", path)
    return model, path


@pytest.fixture(scope="module")
def compressed(tiny_llama, tmp_path_factory):
    _, src = tiny_llama
    out = tmp_path_factory.mktemp("lowrank") / "svd-llm"
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("Once upon a time there was a little dog who liked to run in the park.\n" * 40)
    argv = ["compress", "--model", str(src), "--out", str(out), "--low-rank", "0.6", "--method", "svd-llm",
            "--calib", str(calib), "--num-samples", "4", "--seq-len", "32"]  # fmt: skip
    assert cli_main(argv) == 0
    return out


def dense_from_factors(out) -> dict[str, torch.Tensor]:
    """The HF state dict with every factorized weight multiplied out, from the saved tensors alone."""
    tensors = load_file(str(out / "model.safetensors"))
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    state = {k: v for k, v in tensors.items() if not any(k.startswith(f"{layer}.") and k[len(layer) + 1 :] in e["tensors"] for layer, e in layers.items())}  # fmt: skip
    for layer, entry in layers.items():
        assert entry["kind"] == "low_rank" and entry["metadata"] == {"parts": 1}
        u, v = tensors.get(f"{layer}.u0"), tensors[f"{layer}.v0"]
        state[f"{layer}.weight"] = v if u is None else u @ v
    return state


def test_compressed_model_equals_the_dense_product_of_its_saved_factors(tiny_llama, compressed):
    hf_model, _ = tiny_llama
    hf_model.load_state_dict(dense_from_factors(compressed), strict=False)
    llm = LLM(str(compressed), dtype="float32", kv_cache_memory=KV_BYTES, show_progress=False)
    model = llm.engine.runner.model
    backends = {m._kernel_state.backend for _, m in model.compressible_linears() if m.quantized is not None}
    assert backends == {"low-rank"}
    ids = torch.tensor([[1, 45, 300, 22, 7, 101, 9, 13]])
    with torch.no_grad():
        expected = hf_model(ids).logits[0]
        ours = model.compute_logits(model.forward_dense(ids)[0])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_compressed_model_holds_the_asked_share_of_parameters(tiny_llama, compressed):
    _, src = tiny_llama
    config = json.loads((compressed / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    source = load_file(str(src / "model.safetensors"))
    saved = load_file(str(compressed / "model.safetensors"))
    before = sum(source[f"{layer}.weight"].numel() for layer in layers)
    dense_names = [k for k in source if k.endswith("_proj.weight") and k[: -len(".weight")] not in layers]
    before += sum(source[k].numel() for k in dense_names)
    after = sum(saved[f"{layer}.{key}"].numel() for layer, e in layers.items() for key in e["tensors"])
    after += sum(saved[k].numel() for k in dense_names)
    assert after <= 0.6 * before
    assert config["quantization_config"]["effinfer"]["parameters_after"] == after


def test_low_rank_checkpoint_refuses_quantization_on_top(compressed):
    with pytest.raises(ConfigError, match="already stored as low_rank"):
        LLM(
            str(compressed),
            dtype="float32",
            quantization="int8",
            kv_cache_memory=KV_BYTES,
            show_progress=False,
        )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--low-rank", "1.5"], "share of parameters in (0, 1)"),
        (["--low-rank", "0.5", "--model", "/nonexistent/model"], "does not exist"),
        (["--low-rank", "0.5", "--calib", "/nonexistent/calib.txt"], "does not exist"),
    ],
)
def test_bad_arguments_are_one_line(tiny_llama, tmp_path, capsys, extra, message):
    _, src = tiny_llama
    argv = ["compress", "--model", str(src), "--out", str(tmp_path / "out"), *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_a_gguf_model_is_factorized_from_its_float_weights(tiny_llama, tmp_path):
    """GGUF in (q/k rows permuted as llama.cpp stores them): the factors approximate the HF weights
    with exactly the truncated-SVD error, and the written directory has its own tokenizer and config."""
    from effinfer.convert import convert_to_gguf

    _, src = tiny_llama
    gguf_file = convert_to_gguf(src, tmp_path / "tiny.gguf", "f32")
    out = tmp_path / "out"
    assert cli_main(["compress", "--model", str(gguf_file), "--out", str(out), "--low-rank", "0.6",
                     "--method", "svd"]) == 0  # fmt: skip
    source = load_file(str(src / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.2.mlp.down_proj",
    ):
        w = source[f"{name}.weight"].double()
        u, v = saved.get(f"{name}.u0"), saved[f"{name}.v0"]
        if u is None:
            continue
        error = torch.linalg.matrix_norm(w - u.double() @ v.double()) ** 2
        torch.testing.assert_close(
            error, torch.linalg.svdvals(w)[u.shape[1] :].square().sum(), rtol=1e-3, atol=1e-6
        )
    assert layers and (out / "tokenizer.json").is_file()
    llm = LLM(str(out), dtype="float32", kv_cache_memory=KV_BYTES, show_progress=False)
    assert len(llm.generate(["Once upon a time"], SamplingParams(max_tokens=4))[0].outputs[0].token_ids) == 4


def test_a_quantized_gguf_model_is_factorized_from_its_dequantized_blocks(tiny_llama, tmp_path):
    """A Q4_0 GGUF (as the real SmolLM2 file is Q4_1): the global budget needs every matrix's
    spectrum, so the blocks must be dequantized, not released by the inference loader. The factors
    reach the truncated-SVD error of the weights as llama.cpp's own gguf-py dequantizes them."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from effinfer.convert import convert_to_gguf

    _, src = tiny_llama
    gguf_file = convert_to_gguf(src, tmp_path / "tiny-q4_0.gguf", "q4_0")
    out = tmp_path / "out"
    assert cli_main(["compress", "--model", str(gguf_file), "--out", str(out), "--low-rank", "0.6",
                     "--method", "svd"]) == 0  # fmt: skip
    stored = {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(gguf_file).tensors}
    saved = load_file(str(out / "model.safetensors"))
    checked = 0
    # v, o and down are stored unpermuted, so the GGUF tensor is the HF weight row for row.
    for hf_name, gguf_name in (
        ("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight"),
        ("model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight"),
        ("model.layers.2.mlp.down_proj", "blk.2.ffn_down.weight"),
    ):
        w = torch.from_numpy(stored[gguf_name].copy()).double()
        u, v = saved.get(f"{hf_name}.u0"), saved.get(f"{hf_name}.v0")
        if u is None:
            torch.testing.assert_close(saved[f"{hf_name}.weight"].double(), w)  # kept dense: the same weights
            continue
        error = torch.linalg.matrix_norm(w - u.double() @ v.double()) ** 2
        torch.testing.assert_close(
            error, torch.linalg.svdvals(w)[u.shape[1] :].square().sum(), rtol=1e-3, atol=1e-6
        )
        checked += 1
    assert checked
