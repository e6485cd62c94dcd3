"""Mixture-of-Experts families against transformers: random-initialised Mixtral, Qwen2-MoE (shared
expert, a dense layer through ``mlp_only_layers``) and Qwen3-MoE (dense layers through
``decoder_sparse_step``, renormalised top-k) in float32 must give HF's logits and HF's greedy tokens,
batched with prompts joining at different steps; also from transformers-5 stacked expert tensors,
with RTN int8 / int4 experts (close to float), and with per-layer expert counts equal to HF's router.
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from effinfer import LLM, SamplingParams
from effinfer.config import ConfigError, ModelConfig
from effinfer.layers.linear import Linear
from effinfer.layers.moe import SparseMoE, TopKRouter, grouped_expert_forward, record_expert_load
from effinfer.loading.gguf import GGUFFile
from effinfer.quant import registry as quant_registry

from .conftest import TINY, copy_tokenizer
from .test_models_vs_hf import _all_position_logits

SMALL = {**TINY, "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2}
MODELS = {
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    # Layers 0, 1 and 3 sparse (with the shared expert), layer 2 dense; top-2 weights not renormalised.
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        dict(
            num_hidden_layers=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[2],
            norm_topk_prob=False,
        ),
    ),
    # decoder_sparse_step 2: layers 1 and 3 sparse, 0 and 2 dense; top-2 of 8 renormalised; q/k norm.
    "qwen3-moe": (
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=4,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=2,
            norm_topk_prob=True,
        ),
    ),
}
NEW_TOKENS = 24


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [[1] + torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 17, 30, 9)]


PROMPTS = _prompts()


def make_moe(arch: str, directory, **overrides):
    import transformers

    config = getattr(transformers, arch).config_class(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # a wide spread, so greedy decoding and routing are decisive
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0, 0.08 if p.dim() > 1 else 0.02)
    model.save_pretrained(directory)
    copy_tokenizer(directory)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def moe(request, tmp_path_factory):
    """(HF model, its directory, HF's greedy continuation of each prompt)."""
    arch, overrides = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_moe(arch, path, **overrides)
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            expected.append(out[0, len(prompt) :].tolist())
    return hf, path, expected


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", show_progress=False, block_size=4, **kwargs)


def _hf_is_sparse(layer) -> bool:
    return hasattr(layer.mlp, "experts")


def test_config_selects_the_sparse_layers_transformers_builds(moe):
    hf, path, _ = moe
    config = ModelConfig.from_dir(path)
    assert config.sparse_layers == [_hf_is_sparse(layer) for layer in hf.model.layers]
    assert config.num_experts == len(hf.model.layers[1].mlp.experts.gate_up_proj)
    assert config.norm_topk_prob == getattr(hf.config, "norm_topk_prob", True)
    assert bool(config.shared_expert_intermediate_size) == hasattr(hf.model.layers[1].mlp, "shared_expert")


def test_prefill_logits_match_hf(moe):
    hf, path, _ = moe
    llm = _llm(path)
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0]
        assert (_all_position_logits(llm, prompt) - expected).abs().max().item() < 1e-4


def _staggered_greedy(llm: LLM) -> list[list[int]]:
    """Greedy tokens of PROMPTS, prompt i joining the running batch at engine step 3i."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    arrivals = {3 * i: prompt for i, prompt in enumerate(PROMPTS)}
    request_ids, tokens = [], {}
    for step in itertools.count():
        if step in arrivals:
            request_ids.append(engine.add_request(arrivals[step], params))
        tokens.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
        if len(tokens) == len(PROMPTS):
            return [tokens[i] for i in request_ids]


def test_greedy_matches_hf_generate_with_staggered_arrivals(moe):
    _, path, expected = moe
    assert _staggered_greedy(_llm(path)) == expected


def test_stacked_expert_tensors_load_as_transformers_5_holds_them(moe, tmp_path):
    """transformers 5 keeps a layer's experts as [E, 2I, hidden] gate_up_proj and [E, hidden, I]
    down_proj; a checkpoint written that way loads to the same logits."""
    hf, path, _ = moe
    state = {name: t.contiguous() for name, t in hf.state_dict().items()}
    assert any(name.endswith("mlp.experts.gate_up_proj") and t.dim() == 3 for name, t in state.items())
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    copy_tokenizer(tmp_path)
    prompt = PROMPTS[2]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    assert (_all_position_logits(_llm(tmp_path), prompt) - expected).abs().max().item() < 1e-4


def _rounded_like_effinfer(hf, scheme: str):
    """A copy of the HF model whose weights are what quantize-on-load stores, dequantised: every
    decoder projection (attention, each expert, the shared expert, dense MLPs) by ``scheme``, the
    output projection as the scheme keeps it; embeddings, norms, the router and the shared-expert
    gate untouched. The schemes round each output row on its own, so fused and split tensors agree."""
    entry = quant_registry.scheme(scheme)
    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            router = name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
            if name == "lm_head.weight" and entry.quantize_lm_head is not None:
                p.copy_(entry.quantize_lm_head(p).dequantize(torch.float32))
            elif ".layers." in name and p.dim() >= 2 and not router:
                for matrix in p.view(-1, *p.shape[-2:]):  # a stack of experts: each expert on its own
                    matrix.copy_(entry.quantize(matrix.clone()).dequantize(torch.float32))
    return rounded


@pytest.mark.parametrize("scheme, rel_error, agreement", [("int8", 0.1, 0.9), ("int4", 0.45, 0.5)])
def test_rtn_quantized_experts(moe, scheme, rel_error, agreement):
    """Quantize-on-load rewrites every expert (and the shared expert); the router stays float32.
    The quantized model computes exactly what HF computes with the same rounded weights, stays
    within a loose bound of the float logits, and teacher-forced on HF's float greedy
    continuations mostly picks the same next token (random Gaussian weights are the hard case
    for 4 bits: ~25% relative logit error)."""
    hf, path, expected = moe
    llm = _llm(path, quantization=scheme)
    model = llm.engine.runner.model
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    expert_linears = [m for b in blocks for e in b.experts for m in e.modules() if isinstance(m, Linear)]
    assert expert_linears and all(linear.quantized is not None for linear in expert_linears)
    assert all(block.gate.weight.dtype == torch.float32 and block.gate.weight.numel() for block in blocks)
    rounded = _rounded_like_effinfer(hf, scheme)
    agree = total = 0
    for prompt, continuation in zip(PROMPTS, expected):
        sequence = torch.tensor([prompt + continuation])
        with torch.no_grad():
            float_logits, rounded_logits = hf(sequence).logits[0], rounded(sequence).logits[0]
        ours = _all_position_logits(llm, prompt + continuation)
        assert (ours - rounded_logits).abs().max().item() < 1e-3
        rms = (ours - float_logits).pow(2).mean().sqrt() / float_logits.pow(2).mean().sqrt()
        assert 0 < rms.item() < rel_error
        picked = ours[len(prompt) - 1 : -1].argmax(dim=-1)
        agree += (picked == torch.tensor(continuation)).sum().item()
        total += len(continuation)
    assert agree >= agreement * total, (agree, total)
    # The quantized experts also run through the engine's batched generation.
    outputs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]


def test_expert_load_counts_equal_hf_routing(moe):
    """Per sparse layer, the tokens routed to each expert during a prefill are the ones HF's router
    picks (its router logits, top-k)."""
    hf, path, _ = moe
    llm = _llm(path)
    prompt = PROMPTS[2]
    with torch.no_grad():
        router_logits = hf(torch.tensor([prompt]), output_router_logits=True).router_logits
    top_k = hf.config.num_experts_per_tok
    num_experts = router_logits[0].shape[-1]
    expected = torch.stack(
        [
            torch.bincount(r.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts)
            for r in router_logits
        ]
    )
    with record_expert_load(llm.engine.runner.model) as load:
        _all_position_logits(llm, prompt)
    assert torch.equal(load.counts, expected)
    assert len(load.layers) == sum(_hf_is_sparse(layer) for layer in hf.model.layers)
    assert torch.allclose(load.fractions().sum(dim=1), torch.ones(len(load.layers)))
    assert all(b.expert_load is None for b in llm.engine.runner.model.modules() if isinstance(b, SparseMoE))


def _per_token_reference(x, experts, ids, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            out[t] += weights[t, j] * experts[int(ids[t, j])](x[t : t + 1])[0]
    return out


def test_grouped_dispatch_equals_a_per_token_loop():
    """Unused experts, an expert taking every token, a single token: the grouped sum is the plain one."""
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(torch.nn.Linear(16, 16, bias=False) for _ in range(6))
    x = torch.randn(9, 16)
    ids = torch.stack([torch.full((9,), 4), torch.tensor([0, 1, 0, 5, 1, 0, 5, 0, 1])], dim=1)
    weights = torch.rand(9, 2)
    with torch.no_grad():
        out, counts = grouped_expert_forward(x, experts, ids, weights)
        torch.testing.assert_close(out, _per_token_reference(x, experts, ids, weights))
        assert counts.tolist() == [4, 3, 0, 0, 9, 2]
        single, _ = grouped_expert_forward(x[:1], experts, ids[:1], weights[:1])
        torch.testing.assert_close(single, _per_token_reference(x[:1], experts, ids[:1], weights[:1]))


def test_router_renormalises_only_when_asked():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    for renormalize in (True, False):
        router = TopKRouter(8, 4, 2, renormalize)
        torch.nn.init.normal_(router.weight)
        weights, ids = router(x)
        probs = torch.softmax(x @ router.weight.T, dim=-1)
        expected = probs.gather(1, ids)
        if renormalize:
            expected = expected / expected.sum(dim=1, keepdim=True)
        torch.testing.assert_close(weights, expected)
        assert torch.equal(ids, probs.topk(2, dim=-1).indices)


def test_bad_moe_config_is_one_clear_error(tmp_path):
    import transformers

    arch, overrides = MODELS["qwen3-moe"]
    config = transformers.Qwen3MoeConfig(**{**SMALL, **overrides}).to_dict()
    config.update(architectures=[arch], num_experts_per_tok=9)
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\) exceeds num_experts \(8\)"):
        ModelConfig.from_hf(config)
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "num_experts_per_tok": 2, "decoder_sparse_step": 0})
    )
    with pytest.raises(ConfigError, match="decoder_sparse_step must be a positive integer"):
        ModelConfig.from_dir(tmp_path)


# ---------------------------------------------------------------- GGUF against llama.cpp (opt-in)

# llama.cpp's converter (``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, with its
# ``gguf-py`` next to it): $EFFINFER_CONVERT_HF_TO_GGUF, else the sdist unpacked in SDIST_CACHE by
#   pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d ~/.cache/effinfer-sdist
#   tar xzf ~/.cache/effinfer-sdist/llama_cpp_python-0.3.36.tar.gz -C ~/.cache/effinfer-sdist \
#       llama_cpp_python-0.3.36/vendor/llama.cpp
SDIST_CACHE = Path.home() / ".cache" / "effinfer-sdist"
CONVERTER = os.environ.get("EFFINFER_CONVERT_HF_TO_GGUF") or str(
    SDIST_CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
)
GGUF_MODELS = {  # llama.cpp's qwen2moe / qwen3moe have no dense layers
    "qwen2moe": ("Qwen2MoeForCausalLM", {**MODELS["qwen2-moe"][1], "mlp_only_layers": []}),
    "qwen3moe": ("Qwen3MoeForCausalLM", {**MODELS["qwen3-moe"][1], "decoder_sparse_step": 1}),
    # Written by llama.cpp as a ``llama`` file with expert tensors and ``llama.expert_count``; experts
    # 64 wide, so that every expert matrix's rows are whole 32-value blocks when quantized.
    "mixtral": ("MixtralForCausalLM", {**MODELS["mixtral"][1], "intermediate_size": 64}),
}
# (model, llama.cpp quantization of the converted file or None for float32)
GGUF_CASES = [(name, None) for name in GGUF_MODELS] + [
    ("mixtral", "MOSTLY_Q8_0"),
    ("qwen3moe", "MOSTLY_Q4_0"),
]


# The test tokenizer is none the converter recognises by its pre-tokenizer hash; the tests feed
# token ids, so the converter is told to write the plain "default" pre-tokenizer.
_CONVERT = """
import runpy, sys
converter, gguf_py, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [str(__import__("pathlib").Path(converter).parent), gguf_py]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.argv = [converter, *args]
runpy.run_path(converter, run_name="__main__")
"""


def _convert(hf_dir: Path, out: Path) -> Path:
    if not CONVERTER or not Path(CONVERTER).is_file():
        pytest.skip(f"no llama.cpp converter at {CONVERTER} (set EFFINFER_CONVERT_HF_TO_GGUF)")
    gguf_py = str(Path(CONVERTER).parent / "gguf-py")
    command = [
        sys.executable,
        "-c",
        _CONVERT,
        CONVERTER,
        gguf_py,
        str(hf_dir),
        "--outtype",
        "f32",
        "--outfile",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _quantize(llama_cpp, source: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (it keeps the router ``ffn_gate_inp`` in float)."""
    target = source.with_name(f"{source.stem}-{ftype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    assert status == 0, f"llama_model_quantize failed with {status}"
    return target


@pytest.mark.slow
@pytest.mark.parametrize("name, ftype", GGUF_CASES)
def test_gguf_from_llama_cpp_converter_agrees_with_llama_cpp(name, ftype, tmp_path):
    """A random HF model converted by llama.cpp's own converter (and quantized by its quantizer):
    effinfer's teacher-forced greedy next tokens on llama.cpp's greedy continuations equal
    llama.cpp's, and the float logits agree; quantized experts stay in their GGUF blocks."""
    llama_cpp = pytest.importorskip("llama_cpp")
    arch, overrides = GGUF_MODELS[name]
    hf = make_moe(arch, tmp_path / "hf", **overrides)
    path = _convert(tmp_path / "hf", tmp_path / f"{name}.gguf")
    if ftype is not None:
        path = _quantize(llama_cpp, path, ftype)
        assert ftype.removeprefix("MOSTLY_") in {t.qtype.name for t in GGUFFile(path).tensors.values()}
    reference = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_threads=2, seed=0, logits_all=True, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    llm = _llm(path)
    model = llm.engine.runner.model
    assert model.config.num_experts == overrides.get("num_experts", overrides.get("num_local_experts"))
    if ftype is not None:  # every expert runs from llama.cpp's own blocks, not dequantised
        experts = [m for n, m in model.named_modules() if ".experts." in n and isinstance(m, Linear)]
        assert experts and all(m.quantized is not None for m in experts)
    agree = total = 0
    for prompt in PROMPTS:
        generated = []
        for token in reference.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            generated.append(token)
            if len(generated) == NEW_TOKENS:
                break
        reference.reset()
        reference.eval(prompt + generated)
        theirs = torch.tensor(reference.scores[: len(prompt) + len(generated)])
        ours = _all_position_logits(llm, prompt + generated)
        with torch.no_grad():
            hf_logits = hf(torch.tensor([prompt + generated])).logits[0]
        if ftype is None:  # quantized, llama.cpp also rounds the activations to 8 bits
            assert (ours - theirs).abs().max().item() < 1e-3 * hf_logits.abs().max().item() + 1e-3
        picked = ours[len(prompt) - 1 : -1].argmax(dim=-1).tolist()
        agree += sum(a == b for a, b in zip(picked, generated))
        total += len(generated)
    assert agree >= (0.95 if ftype is None else 0.9) * total, (agree, total)
