"""Structured pruning (``compress/prune/structured.py``) against an independent reference on transformers'
own model: the kept heads/channels are the highest by the importance as defined (recomputed here with
HF hooks, layer by layer on the already-masked model), the pruned checkpoint computes exactly what the
original computes with the removed heads and channels zeroed, transformers loads it with the same
logits as effinfer, the config counts are right, and bad settings fail with a one-line error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effinfer import LLM
from effinfer.compress.prune.structured import load_float, main, prune_structured, save_pruned
from effinfer.config import ConfigError

from .conftest import make_hf_model
from .test_gemma3 import make_gemma3
from .test_mha_to_gqa import TOKENS, effinfer_logits

transformers = pytest.importorskip("transformers")

# hidden 96 = 8 heads of 12: every kept head count (1, 2, 3, 4, 6, 8) divides it, as transformers' Llama needs.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 96, 8, 4, 12, 160
# (sparsity, query_sparsity, importance) -> (KV heads, query heads, MLP channels) kept
CASES = {
    (0.5, 0.0, "activation"): (2, 4, 80),
    (0.25, 0.5, "fluctuation"): (3, 3, 120),
    (0.5, 0.5, "taylor"): (2, 2, 80),
}


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    return make_hf_model(
        "LlamaForCausalLM",
        tmp_path_factory.mktemp("gqa"),
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
    )


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits[0]


def module_input(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What ``module`` receives when transformers runs ``ids``, [tokens, features] in float64."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).double()


def scores(weight: torch.Tensor, x: torch.Tensor, importance: str) -> torch.Tensor:
    """The papers' per-input-channel importance: ||W[:, j]||^2 times E[x_j^2] or Var(x_j)."""
    spread = x.pow(2).mean(dim=0) if importance == "activation" else x.var(dim=0)
    return weight.double().pow(2).sum(dim=0) * spread


def highest(values: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.topk(values, count).indices.tolist())


def taylor_terms(hf, ids) -> dict[torch.nn.Module, torch.Tensor]:
    """LLM-Pruner's |w * dL/dw| of each projection's weight, L the summed next-token loss on ``ids``."""
    model = copy.deepcopy(hf)
    logits = model(ids).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    originals = dict(zip(model.modules(), hf.modules()))
    return {
        originals[m]: (m.weight.double() * m.weight.grad.double()).abs()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.weight.grad is not None
    }


def attention_scores(hf, layer, ids, importance: str, taylor: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per query head, score per KV group besides its query heads') as the papers define them:
    activation scores on the current (already masked) model, Taylor terms of the unpruned one."""
    attn = layer.self_attn
    if importance != "taylor":
        heads = scores(attn.o_proj.weight, module_input(hf, attn.o_proj, ids), importance)
        return heads.view(HEADS, HEAD_DIM).sum(dim=1), torch.zeros(KV_HEADS, dtype=torch.float64)
    heads = taylor[attn.q_proj].sum(dim=1) + taylor[attn.o_proj].sum(dim=0)
    kv = taylor[attn.k_proj].sum(dim=1) + taylor[attn.v_proj].sum(dim=1)
    return heads.view(HEADS, HEAD_DIM).sum(dim=1), kv.view(KV_HEADS, HEAD_DIM).sum(dim=1)


def mlp_scores(hf, layer, ids, importance: str, taylor: dict) -> torch.Tensor:
    mlp = layer.mlp
    if importance != "taylor":
        return scores(mlp.down_proj.weight, module_input(hf, mlp.down_proj, ids), importance)
    return (
        taylor[mlp.gate_proj].sum(dim=1) + taylor[mlp.up_proj].sum(dim=1) + taylor[mlp.down_proj].sum(dim=0)
    )


def reference_pruning(hf, ids, kept: tuple[int, int, int], importance: str):
    """Per layer (kept KV heads, kept query heads, kept channels) chosen on transformers' model, which
    is left with the removed heads' o_proj columns and channels' down_proj columns zeroed."""
    kv_kept, heads_kept, channels_kept = kept
    per_group, group = heads_kept // kv_kept, HEADS // KV_HEADS
    taylor = taylor_terms(hf, ids) if importance == "taylor" else {}
    plans = []
    for layer in hf.model.layers:
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        head_scores, group_extra = attention_scores(hf, layer, ids, importance, taylor)
        groups = highest(head_scores.view(KV_HEADS, group).sum(dim=1) + group_extra, kv_kept)
        heads = [
            g * group + h
            for g in groups
            for h in highest(head_scores[g * group : (g + 1) * group], per_group)
        ]
        with torch.no_grad():
            for h in set(range(HEADS)) - set(heads):
                o_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        channels = highest(mlp_scores(hf, layer, ids, importance, taylor), channels_kept)
        with torch.no_grad():
            down_proj.weight[:, sorted(set(range(INTERMEDIATE)) - set(channels))] = 0
        plans.append((groups, heads, channels))
    return plans


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"s{c[0]}-q{c[1]}-{c[2]}")
def test_pruned_model_is_the_masked_original_and_a_valid_hf_checkpoint(gqa_llama, tmp_path, case):
    hf, source = gqa_llama
    sparsity, query_sparsity, importance = case
    kv_kept, heads_kept, channels_kept = CASES[case]
    model, hf_config, tokenizer = load_float(source)
    ids = calibration_ids()
    plans = prune_structured(
        model, ids, sparsity, query_sparsity=query_sparsity, importance=importance, show_progress=False
    )
    out = tmp_path / "pruned"
    save_pruned(model, hf_config, tokenizer, out, torch.float32)

    masked = copy.deepcopy(hf)
    reference = reference_pruning(masked, ids, CASES[case], importance)
    assert [(p.kv_heads, p.query_heads, p.channels) for p in plans] == reference

    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (heads_kept, kv_kept)
    assert (config["intermediate_size"], config["head_dim"], config["hidden_size"]) == (
        channels_kept,
        HEAD_DIM,
        HIDDEN,
    )
    tensors = load_file(out / "model.safetensors")
    layer = "model.layers.2."
    assert tensors[layer + "self_attn.q_proj.weight"].shape == (heads_kept * HEAD_DIM, HIDDEN)
    assert tensors[layer + "self_attn.v_proj.weight"].shape == (kv_kept * HEAD_DIM, HIDDEN)
    assert tensors[layer + "self_attn.o_proj.weight"].shape == (HIDDEN, heads_kept * HEAD_DIM)
    assert tensors[layer + "mlp.up_proj.weight"].shape == (channels_kept, HIDDEN)
    assert tensors[layer + "mlp.down_proj.weight"].shape == (HIDDEN, channels_kept)

    pruned_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = effinfer_logits(out)
    torch.testing.assert_close(ours, hf_logits(pruned_hf), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, hf_logits(masked), rtol=0, atol=1e-4)
    assert not torch.allclose(ours, hf_logits(hf), atol=1e-2)  # pruning did change the model


def test_zero_sparsity_keeps_the_model(gqa_llama):
    hf, source = gqa_llama
    model, _, _ = load_float(source)
    prune_structured(model, calibration_ids(), 0.0, show_progress=False)
    assert (model.config.num_heads, model.config.num_kv_heads) == (HEADS, KV_HEADS)
    with torch.no_grad():
        ours = model.compute_logits(model.forward_dense(torch.tensor(TOKENS)))[0]
    torch.testing.assert_close(ours, hf_logits(hf), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), "sparsity must be a number in [0, 1)"),
        (dict(sparsity=-0.1), "sparsity must be a number in [0, 1)"),
        (dict(sparsity="half"), "sparsity must be a number in [0, 1)"),
        (dict(sparsity=0.9), "would remove all 4 KV groups"),
        (dict(sparsity=0.2, query_sparsity=0.5, mlp_sparsity=1.5), "MLP sparsity must be"),
        (dict(sparsity=0.2, importance="gradient"), "unknown importance 'gradient'"),
    ],
)
def test_bad_settings_fail_before_anything_changes(gqa_llama, kwargs, message):
    model, _, _ = load_float(gqa_llama[1])
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match=None) as error:
        prune_structured(model, calibration_ids(), show_progress=False, **kwargs)
    assert message in str(error.value)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_head_count_transformers_refuses_is_an_error(tmp_path):
    _, source = make_hf_model("LlamaForCausalLM", tmp_path, hidden_size=64, num_key_value_heads=4)
    model, _, _ = load_float(source)
    with pytest.raises(
        ConfigError, match="needs hidden_size \\(64\\) to be a multiple of num_attention_heads"
    ):
        prune_structured(model, calibration_ids(), 0.25, query_sparsity=0.5, show_progress=False)


def test_command_line_error_is_one_line(gqa_llama, tmp_path, capsys):
    code = main(["--model", str(gqa_llama[1]), "--out", str(tmp_path / "o"), "--sparsity", "1.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--sparsity must be a number in [0, 1)" in err


def test_gguf_model_is_dequantized_pruned_and_written_with_its_tokenizer(shared_data, tmp_path):
    gguf = shared_data / "stories260K" / "stories260K.gguf"
    if not gguf.is_file():
        pytest.skip("stories260K.gguf is not present")
    out = tmp_path / "pruned"
    args = ["--model", str(gguf), "--out", str(out), "--sparsity", "0.5", "--save-dtype", "float32"]
    calib = tmp_path / "calib.txt"
    calib.write_text((shared_data / "text" / "tinystories_valid.txt").read_text()[:20000])
    args += ["--calib", str(calib), "--num-samples", "4"]
    assert main([*args, "--seq-len", "64"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    pruned_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(effinfer_logits(out), hf_logits(pruned_hf), rtol=0, atol=1e-4)
    llm = LLM(str(out), dtype="float32", device="cpu", show_progress=False)
    original = LLM(str(gguf), dtype="float32", device="cpu", show_progress=False)
    text = "Once upon a time, there was a little girl"
    assert llm.tokenizer.encode(text) == original.tokenizer.encode(text)


def test_gemma3_is_pruned_through_the_same_interface(tmp_path):
    make_gemma3(tmp_path / "gemma")
    model, hf_config, tokenizer = load_float(tmp_path / "gemma")
    prune_structured(model, calibration_ids(), 0.5, show_progress=False)
    out = tmp_path / "pruned"
    save_pruned(model, hf_config, tokenizer, out, torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 32)
    pruned_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(effinfer_logits(out), hf_logits(pruned_hf), rtol=0, atol=1e-4)
