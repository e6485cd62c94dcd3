"""Pruning against the papers' definitions: Wanda's score and row-wise selection, exact N:M masks,
SparseGPT's reconstruction error below magnitude's and Wanda's, and ``effinfer prune`` end to end
(an HF directory and a quantized GGUF in, a checkpoint out that transformers loads)."""

from __future__ import annotations

import json

import pytest
import torch

from effinfer.cli import main as cli_main
from effinfer.compress.prune.magnitude import prune_weight_magnitude
from effinfer.compress.prune.masks import SparsityPattern
from effinfer.compress.prune.sparsegpt import sparsegpt_prune_weight
from effinfer.compress.prune.wanda import InputNormAccumulator, prune_weight_wanda
from effinfer.loading.checkpoint import open_checkpoint

from .conftest import make_hf_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer_data(out_features: int = 32, in_features: int = 64, tokens: int = 512, seed: int = 0):
    """A weight and inputs whose features are correlated and of very different sizes, as in an LLM."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    mixing = torch.eye(in_features, dtype=torch.float64) + 0.5 * torch.randn(
        in_features, in_features, generator=gen, dtype=torch.float64
    )
    scales = torch.exp(torch.randn(in_features, generator=gen, dtype=torch.float64))
    x = torch.randn(tokens, in_features, generator=gen, dtype=torch.float64) @ mixing * scales
    return weight, x


def _input_norms(x: torch.Tensor) -> torch.Tensor:
    acc = InputNormAccumulator(x.shape[1], x.device)
    for chunk in x.split(100):  # the norm must be over all tokens, not the last chunk
        acc.add(chunk)
    return acc.norms()


def _wanda(weight, x, pattern):
    pruned = weight.clone()
    prune_weight_wanda(pruned, _input_norms(x), pattern)
    return pruned


def _magnitude(weight, x, pattern):
    pruned = weight.clone()
    prune_weight_magnitude(pruned, pattern)
    return pruned


def _sparsegpt(weight, x, pattern):
    return sparsegpt_prune_weight(weight, 2 * x.T @ x / len(x), pattern)


# ---- Wanda: |W_ij| * ||X_j||_2, the lowest of each output row zeroed, no update -----------------


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_zeroes_exactly_the_lowest_scores_of_each_row(sparsity):
    weight, x = _layer_data()
    pruned = _wanda(weight, x, SparsityPattern(sparsity))
    score = weight.abs() * x.square().sum(0).sqrt()  # the paper's metric, computed here from its formula
    k = int(torch.tensor(weight.shape[1] * sparsity).ceil())
    lowest = score.argsort(dim=1)[:, :k]
    expected_mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, lowest, True)
    assert torch.equal(pruned == 0, expected_mask)
    assert torch.equal(pruned[~expected_mask], weight[~expected_mask])  # survivors keep their values
    # The activations matter: magnitude alone would pick other weights.
    assert not torch.equal(pruned == 0, _magnitude(weight, x, SparsityPattern(sparsity)) == 0)


# ---- N:M: at most N non-zeros in every M consecutive inputs, the kept ones the best-scoring ------


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_n_m_masks_keep_the_top_n_of_every_group(method, n, m):
    weight, x = _layer_data()
    pattern = SparsityPattern.parse(f"{n}:{m}")
    if method == "wanda":
        pruned, score = _wanda(weight, x, pattern), weight.abs() * x.square().sum(0).sqrt()
    else:
        pruned, score = _magnitude(weight, x, pattern), weight.abs()
    groups = score.reshape(weight.shape[0], -1, m)
    nth_best = groups.sort(dim=-1, descending=True).values[..., n - 1 : n]
    expected_kept = (groups >= nth_best).reshape(weight.shape)
    assert torch.equal(pruned != 0, expected_kept)
    assert ((pruned != 0).reshape(weight.shape[0], -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_sparsegpt_n_m_pattern_is_exact(n, m):
    weight, x = _layer_data(in_features=256)  # two blocks of 128 columns
    pruned = _sparsegpt(weight, x, SparsityPattern.parse(f"{n}:{m}"))
    assert ((pruned != 0).reshape(weight.shape[0], -1, m).sum(-1) <= n).all()
    assert (pruned == 0).double().mean() >= 1 - n / m


def test_sparsegpt_without_input_correlation_is_magnitude():
    """With H = c·I the OBS error is w²·c and no update moves across columns: N:M SparseGPT = magnitude."""
    weight, _ = _layer_data()
    pattern = SparsityPattern.parse("2:4")
    pruned = sparsegpt_prune_weight(weight, 3 * torch.eye(64, dtype=torch.float64), pattern)
    assert torch.allclose(pruned, _magnitude(weight, None, pattern))


# ---- SparseGPT's update: lower reconstruction error at the same mask budget -------------------


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_sparsegpt_reconstructs_the_layer_output_best(sparsity):
    weight, x = _layer_data(in_features=256)
    pattern = SparsityPattern.parse(sparsity)
    errors, zeros = {}, {}
    for name, method in (("magnitude", _magnitude), ("wanda", _wanda), ("sparsegpt", _sparsegpt)):
        pruned = method(weight, x, pattern)
        errors[name] = torch.linalg.norm(x @ weight.T - x @ pruned.T).item()
        zeros[name] = int((pruned == 0).sum())
    assert len(set(zeros.values())) == 1 and zeros["wanda"] == weight.numel() // 2  # the same budget
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ---- effinfer prune end to end --------------------------------------------------------------


def _hf_weights(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, {name: p.detach() for name, p in model.named_parameters()}


def _logits_match(path, hf_model):
    """effinfer and transformers compute the same logits from the pruned checkpoint."""
    model = open_checkpoint(path).load_model(torch.float32, torch.device("cpu"), 64, show_progress=False)
    ids = torch.tensor([[1, 17, 99, 305, 7, 42, 400, 3, 250, 11]])
    with torch.no_grad():
        ours = model.compute_logits(model.forward_dense(ids))
        expected = hf_model(ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    model, path = make_hf_model("LlamaForCausalLM", tmp_path_factory.mktemp("tiny"), rope_theta=50000.0)
    return {name: p.detach() for name, p in model.named_parameters()}, path


CALIB = ["--num-samples", "4", "--seq-len", "32"]


@pytest.mark.parametrize("method,sparsity", [("wanda", "0.5"), ("sparsegpt", "0.5"), ("sparsegpt", "2:4")])
def test_prune_cli_writes_a_sparse_checkpoint_transformers_loads(tiny_llama, tmp_path, method, sparsity):
    original, path = tiny_llama
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(path), "--method", method, "--sparsity", sparsity, "--out", str(out)]
    assert cli_main([*args, *CALIB]) == 0
    hf_model, pruned = _hf_weights(out)
    matrices = [name for name in pruned if name.rpartition(".")[0].endswith(PROJECTIONS)]
    assert len(matrices) == 3 * len(PROJECTIONS)
    for name in matrices:
        w = pruned[name]
        assert (w == 0).double().mean() >= 0.5, name
        if sparsity == "2:4":
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), name
        if method == "wanda":  # no weight update: every survivor is the original weight
            assert torch.equal(w[w != 0], original[name][w != 0]), name
    for name in pruned.keys() - set(matrices):  # embeddings, norms and lm_head are not pruned
        assert torch.equal(pruned[name], original[name]), name
    _logits_match(out, hf_model)


def test_prune_cli_structured_writes_a_smaller_model_transformers_loads(tiny_llama, tmp_path):
    """``--method structured`` goes through the same command: smaller matrices, a config that says
    so, and logits transformers reproduces from the written checkpoint."""
    original, path = tiny_llama
    out = tmp_path / "structured"
    args = ["prune", "--model", str(path), "--method", "structured", "--sparsity", "0.5", "--out", str(out)]
    assert cli_main([*args, *CALIB]) == 0
    hf_model, pruned = _hf_weights(out)
    config = json.loads((out / "config.json").read_text())
    before = json.loads((path / "config.json").read_text())
    assert config["intermediate_size"] < before["intermediate_size"]
    assert sum(w.numel() for w in pruned.values()) < sum(w.numel() for w in original.values())
    _logits_match(out, hf_model)


def test_prune_dequantizes_a_gguf_model(tiny_llama, tmp_path):
    from effinfer.convert import convert_to_gguf
    from effinfer.tokenizer import Tokenizer

    original, path = tiny_llama
    gguf = convert_to_gguf(path, tmp_path / "tiny-q8_0.gguf", "q8_0")
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(gguf), "--method", "magnitude", "--sparsity", "4:8", "--out", str(out)]
    assert cli_main(args) == 0
    hf_model, pruned = _hf_weights(out)
    for name in (n for n in pruned if n.rpartition(".")[0].endswith(PROJECTIONS)):
        w, reference = pruned[name], original[name]
        assert ((w != 0).reshape(w.shape[0], -1, 8).sum(-1) == 4).all(), name
        # The survivors are the float weights up to Q8_0 rounding (q/k rows back in HF order).
        torch.testing.assert_close(w[w != 0], reference[w != 0], atol=0.01 * reference.abs().max(), rtol=0)
    _logits_match(out, hf_model)
    text = "Once upon a time, a dog ran."
    assert Tokenizer.from_dir(out).encode(text) == open_checkpoint(gguf).tokenizer.encode(text)


# ---- errors a user can make ---------------------------------------------------------------------


def _error_line(capsys) -> str:
    """The one-line error that ends stderr (loading progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("effinfer: error: "), err
    return last


@pytest.mark.parametrize(
    "sparsity,message",
    [
        ("1.5", "between 0 and 1"),
        ("0", "between 0 and 1"),
        ("half", "neither a share"),
        ("2:x", "N:M with whole numbers"),
        ("4:2", "0 < N < M"),
        ("2:2", "0 < N < M"),
        ("3:7", "not a multiple of M=7"),
    ],
)
def test_bad_sparsity_is_a_one_line_error(tiny_llama, tmp_path, capsys, sparsity, message):
    _, path = tiny_llama
    args = ["prune", "--model", str(path), "--method", "magnitude", "--sparsity", sparsity]
    assert cli_main([*args, "--out", str(tmp_path / "out")]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_paths_are_one_line_errors(tiny_llama, tmp_path, capsys):
    _, path = tiny_llama
    base = ["prune", "--method", "wanda", "--sparsity", "0.5", *CALIB]
    assert cli_main([*base, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([*base, "--model", str(path), "--out", str(path)]) == 2  # would overwrite the model
    assert "not an empty directory" in capsys.readouterr().err
    calib = ["--calib", str(tmp_path / "no.txt")]
    assert cli_main([*base, "--model", str(path), "--out", str(tmp_path / "o"), *calib]) == 2
    assert "calibration file" in _error_line(capsys)
