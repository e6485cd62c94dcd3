"""Every registered model family answers the questions of ``models/base.py``, and the code above the
models asks them instead of reaching into a model's attributes."""

from __future__ import annotations

import ast
from pathlib import Path

import gguf
import pytest
import torch
import transformers

from effinfer.config import ConfigError, ModelConfig, supported_architectures
from effinfer.layers.linear import Linear
from effinfer.models import registry
from effinfer.models.base import CausalLM

from .conftest import TINY

ARCHS = registry.hf_architectures()
PACKAGE = Path(__file__).resolve().parents[1] / "effinfer"


def _hf_config(arch: str) -> transformers.PretrainedConfig:
    """A tiny random-init transformers config of ``arch``, as transformers itself builds it."""
    config_class = getattr(transformers, arch).config_class
    kwargs = {**TINY, "head_dim": 16, "architectures": [arch]}
    if "sliding_window" in config_class().to_dict():  # a window shorter than the test's sequences
        kwargs["sliding_window"] = 8
    return config_class(**kwargs)


def _model(arch: str) -> tuple[CausalLM, ModelConfig]:
    config = ModelConfig.from_hf(_hf_config(arch).to_dict())
    torch.manual_seed(0)
    model = registry.model_class(arch)(config, 64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.08) + (1.0 if "norm" in name else 0.0))
    model.prepare(torch.device("cpu"), torch.float32)
    return model.eval(), config


def test_the_registry_lists_every_family_once_and_config_parsers_agree():
    assert ARCHS and len(ARCHS) == len(set(ARCHS))
    assert supported_architectures() == ARCHS
    for family in registry.FAMILIES:
        assert issubclass(family, CausalLM) and family.hf_architectures and family.gguf_architectures
        for arch in family.hf_architectures:
            assert registry.model_class(arch) is family
        for arch in family.gguf_architectures:
            assert registry.family_for_gguf(arch) is family


def test_unknown_architectures_are_named_with_the_supported_ones():
    with pytest.raises(ConfigError, match=f"unsupported architecture 'GPTNeoX'.*{ARCHS[0]}"):
        registry.model_class("GPTNeoX")
    with pytest.raises(ConfigError, match=f"'gptneox' is not supported.*{registry.gguf_architectures()[0]}"):
        registry.family_for_gguf("gptneox")
    with pytest.raises(ConfigError, match=f"unsupported architecture.*{', '.join(ARCHS)}"):
        ModelConfig.from_hf({**_hf_config(ARCHS[0]).to_dict(), "architectures": ["GPTNeoXForCausalLM"]})


@pytest.mark.parametrize("arch", ARCHS)
def test_family_answers_the_interface(arch):
    model, config = _model(arch)
    assert config.architecture == arch
    layers = model.decoder_layers()
    assert len(layers) == config.num_layers == len(model.cache_specs())
    assert [s.sliding_window for s in model.cache_specs()] == config.sliding_windows

    linears = model.compressible_linears()
    assert linears and all(isinstance(m, Linear) for _, m in linears)
    named = dict(model.named_modules())
    assert all(named[name] is m for name, m in linears)  # names are the model's own
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    assert all(id(m) in in_layers for _, m in linears)  # lm_head stays float
    for _, linear in linears:
        assert sum(model.split_sizes(linear).values()) == linear.out_features

    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.compute_logits(model.forward_dense(ids))
        gen = torch.Generator().manual_seed(1)
        for layer in layers:
            pairs = model.smoothing_pairs(layer)
            assert len({p.name for p in pairs}) == len(pairs)
            layer_modules = {id(m) for m in layer.modules()}
            for pair in pairs:
                assert {linear.in_features for linear in pair.linears} == {pair.channels * pair.fanout}
                if isinstance(pair.prev, Linear):
                    rows = range(pair.prev.out_features)[pair.prev_rows]
                    assert len(rows) == pair.channels
                else:
                    assert pair.prev.weight.numel() == pair.channels
                assert id(pair.block) in layer_modules and id(pair.prev) in layer_modules
                assert all(id(linear) in {id(m) for m in pair.block.modules()} for linear in pair.linears)
                pair.fold(torch.exp(torch.randn(pair.channels, generator=gen)))
        after = model.compute_logits(model.forward_dense(ids))
    # Every pair is an exact rescaling: the folded model computes the same function.
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_hf_tensor_has_a_gguf_name_that_maps_back(arch):
    """HF -> GGUF names agree with gguf-py's own tensor map; GGUF -> HF restores name and values."""
    family = registry.model_class(arch)
    hf_config = _hf_config(arch)
    config = ModelConfig.from_hf(hf_config.to_dict())
    gguf_arch = family.gguf_architecture_for(arch)
    if gguf_arch is None:
        pytest.skip(f"{arch} is not written as GGUF")
    arch_enum = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch]
    reference = gguf.get_tensor_name_map(arch_enum, config.num_layers)
    torch.manual_seed(0)
    hf_model = getattr(transformers, arch)(hf_config)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name, stored = family.hf_tensor_to_gguf(hf_name, tensor, config)
        assert name == reference.get_name(hf_name, try_suffixes=(".weight", ".bias")), hf_name
        back_name, back = family.gguf_tensor(name, stored, config)
        assert back_name == hf_name
        assert torch.equal(back, tensor)
        assert model_param_exists(family, config, hf_name)


def model_param_exists(family: type[CausalLM], config: ModelConfig, hf_name: str) -> bool:
    with torch.device("meta"):
        model = family(config, 8)
    target = model.checkpoint_target(hf_name)
    return target is not None and target[0] in dict(model.named_parameters())


# Attribute names of one family's modules: code above the models that names them is reaching in.
_MODEL_INTERNALS = {
    "self_attn", "mlp", "_split", "input_layernorm", "post_attention_layernorm", "qkv_proj",
    "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "rotary",
}  # fmt: skip


def _reaches(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        nested_model = node.attr == "layers" and isinstance(node.value, ast.Attribute)
        if node.attr in _MODEL_INTERNALS or (nested_model and node.value.attr == "model"):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_the_reach_check_finds_a_reach():
    assert sorted(_reaches("x = model.model.layers[0].self_attn._split")) == [
        "line 1: ._split",
        "line 1: .layers",
        "line 1: .self_attn",
    ]
    assert _reaches('"model.layers.0.self_attn.q_proj"  # a checkpoint name is no reach') == []


@pytest.mark.parametrize("package", ["compress", "loading", "train", "engine"])
def test_no_package_above_the_models_reaches_into_one(package):
    reaches = {
        str(path.relative_to(PACKAGE)): found
        for path in sorted((PACKAGE / package).rglob("*.py"))
        if (found := _reaches(path.read_text()))
    }
    assert reaches == {}, "ask the model (models/base.py) instead"
