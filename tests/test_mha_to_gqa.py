"""``effinfer convert --to-gqa``: KV heads mean-pooled as GQA's paper does, a directory transformers and
effinfer read with the same logits, clear errors, and uptraining with ``effinfer train --init``."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effinfer import LLM
from effinfer.cli import main as cli_main
from effinfer.default_model import DEFAULT_MODEL_DIR
from effinfer.train import main as train_main

from .conftest import make_hf_model

transformers = pytest.importorskip("transformers")

TOKENS = [[1, 17, 99, 305, 12, 400, 7, 63, 200, 5, 88, 301, 44, 9, 150, 260]]


@pytest.fixture(scope="module")
def mha_llama(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    return make_hf_model(
        "LlamaForCausalLM", tmp_path_factory.mktemp("mha"), num_attention_heads=4, num_key_value_heads=4
    )


def convert(source: Path, out: Path, heads: int) -> None:
    assert cli_main(["convert", "--to-gqa", str(heads), str(source), str(out)]) == 0


def hf_logits(path: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits[0]


def effinfer_logits(path: Path) -> torch.Tensor:
    llm = LLM(str(path), dtype="float32", device="cpu", show_progress=False)
    model = llm.engine.runner.model
    with torch.no_grad():
        return model.compute_logits(model.forward_dense(torch.tensor(TOKENS)))[0].float()


def group_means(weight: torch.Tensor, old_heads: int, new_heads: int) -> torch.Tensor:
    """Mean of each group of neighbouring heads, summed head by head (the reference for the pooled rows)."""
    head_dim, per_group = weight.shape[0] // old_heads, old_heads // new_heads
    heads = [weight[h * head_dim : (h + 1) * head_dim] for h in range(old_heads)]
    pooled = []
    for group in range(new_heads):
        members = heads[group * per_group : (group + 1) * per_group]
        total = torch.zeros_like(members[0])
        for member in members:
            total = total + member
        pooled.append(total / per_group)
    return torch.cat(pooled)


@pytest.mark.parametrize("new_heads", [2, 1])
def test_pooled_checkpoint_matches_reference_means_and_transformers(mha_llama, tmp_path, new_heads):
    hf, source = mha_llama
    out = tmp_path / "gqa"
    convert(source, out, new_heads)
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == new_heads and config["num_attention_heads"] == 4
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    original, pooled = hf.state_dict(), load_file(out / "model.safetensors")
    assert set(pooled) == set(load_file(source / "model.safetensors"))
    for layer in range(config["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            torch.testing.assert_close(
                pooled[name], group_means(original[name], 4, new_heads), rtol=0, atol=1e-6
            )
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert torch.equal(pooled[name], original[name])

    expected = hf_logits(out)
    assert (effinfer_logits(out) - expected).abs().max().item() < 1e-4
    # The pooled model is a different function: the logits moved away from the MHA model's.
    with torch.no_grad():
        assert (hf(torch.tensor(TOKENS)).logits[0] - expected).abs().max().item() > 1e-2


def test_as_many_groups_as_heads_is_the_identity(mha_llama, tmp_path):
    hf, source = mha_llama
    convert(source, tmp_path / "same", 4)
    with torch.no_grad():
        expected = hf(torch.tensor(TOKENS)).logits[0]
    assert (effinfer_logits(tmp_path / "same") - expected).abs().max().item() < 1e-4
    assert (hf_logits(tmp_path / "same") - expected).abs().max().item() < 1e-5


def test_qkv_biases_are_pooled_like_weights(tmp_path):
    hf, source = make_hf_model(
        "Qwen2ForCausalLM", tmp_path / "qwen2", num_attention_heads=4, num_key_value_heads=4
    )
    convert(source, tmp_path / "gqa", 2)
    pooled, original = load_file(tmp_path / "gqa" / "model.safetensors"), hf.state_dict()
    name = "model.layers.1.self_attn.v_proj.bias"
    torch.testing.assert_close(pooled[name], group_means(original[name], 4, 2), rtol=0, atol=1e-6)
    assert (effinfer_logits(tmp_path / "gqa") - hf_logits(tmp_path / "gqa")).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ("3", "does not divide the model's 4 attention heads"),
        ("8", "more than the model's 4 KV heads"),
        ("0", "positive"),
    ],
)
def test_bad_head_count_is_one_line_error(mha_llama, tmp_path, capsys, heads, message):
    _, source = mha_llama
    assert cli_main(["convert", "--to-gqa", heads, str(source), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line_errors(mha_llama, tmp_path, capsys):
    _, source = mha_llama
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_head": 4}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "a")], "does not exist"),
        ([str(gpt2), str(tmp_path / "b")], "GPT2LMHeadModel"),
        ([str(source), str(tmp_path / "full")], "not empty"),
        ([str(source), str(source)], "model directory itself"),
        ([str(source)], "needs an output directory"),
    ]
    for paths, message in cases:
        assert cli_main(["convert", "--to-gqa", "2", *paths]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (paths, err)


@pytest.mark.slow
def test_uptraining_the_converted_default_model_lowers_held_out_loss(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [stdlib / name for name in ("json", "logging", "html", "urllib", "http")]
    if not all(s.is_dir() for s in sources):
        pytest.skip("the interpreter's standard library sources are not available")
    convert(DEFAULT_MODEL_DIR, tmp_path / "mqa", 1)
    args = ["--data", *map(str, sources), "--include", "*.py", "--val-fraction", "0.2", "--seq-len", "128"]
    args += ["--init", str(tmp_path / "mqa"), "--out", str(tmp_path / "tuned"), "--max-steps", "8"]
    args += ["--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "8"]
    args += ["--eval-batches", "2", "--seed", "0", "--save-dtype", "float32"]
    assert train_main(args) == 0
    summary = json.loads((tmp_path / "tuned" / "train_summary.json").read_text())
    before, after = summary["evals"][0], summary["evals"][-1]
    assert (before["step"], after["step"]) == (0, 8)
    assert after["loss"] < before["loss"] - 0.05
    tuned = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert tuned["num_key_value_heads"] == 1
    assert effinfer_logits(tmp_path / "tuned").isfinite().all()
