"""``effinfer train``: data pipeline, a loss that falls, an HF export that transformers reads the same way,
exact resume, and data parallelism that follows the single-process curve."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from effinfer.train import main
from effinfer.train.data import (
    PackedTokens,
    RowOrder,
    clean_text,
    collect_files,
    is_validation,
    load_corpus,
)
from effinfer.train.model import lr_factor

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_DIRS = [STDLIB / name for name in ("json", "logging", "html", "urllib", "http")]
VOCAB = 320
TINY = [
    "--include", "*.py",
    "--vocab-size", str(VOCAB),
    "--hidden-size", "32",
    "--layers", "2",
    "--heads", "4",
    "--kv-heads", "2",
    "--intermediate-size", "64",
    "--seq-len", "32",
    "--val-fraction", "0.2",
    "--threads", "1",
]  # fmt: skip
SAMPLE = 'import json\n\n\ndef load(path):\n    """Read {path}."""\n    with open(path) as f:\n        return json.load(f)\n'


def corpus_args() -> list[str]:
    dirs = [str(d) for d in CORPUS_DIRS if d.is_dir()]
    if len(dirs) < 3:
        pytest.skip("the interpreter's standard library sources are not available")
    return ["--data", *dirs]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # --threads changes the whole process's setting; later tests expect theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_train(out: Path, *extra: str) -> dict:
    assert main([*corpus_args(), *TINY, "--out", str(out), *extra]) == 0
    return json.loads((out / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("trained")
    args = ["--max-steps", "60", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "5"]
    summary = run_train(out, *args, "--eval-every", "20", "--eval-batches", "8", "--save-dtype", "float32")
    torch.set_num_threads(threads)
    return out, summary


# ---------------------------------------------------------------- data pipeline


def test_collect_files_filters_and_names(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.txt").write_text("text\n")
    (tmp_path / "pkg" / "c.bin").write_bytes(b"\0\1")
    (tmp_path / "pkg" / "tests" / "t.py").write_text("assert True\n")
    found = collect_files([str(tmp_path)], ["*.py", "*.txt"], ["tests"])
    assert [name for name, _ in found] == ["pkg/a.py", "pkg/b.txt"]
    globbed = collect_files([str(tmp_path / "pkg" / "*.py")], [], [])
    assert [name for name, _ in globbed] == ["a.py"]
    # Two sources with files of the same relative name keep both.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.py").write_text("y = 2\n")
    both = collect_files([str(tmp_path / "pkg"), str(tmp_path / "other")], ["*.py"], ["tests"])
    assert sorted(path.read_text() for _, path in both) == ["x = 1\n", "y = 2\n"]


def test_cleaning_and_dedupe(tmp_path):
    assert clean_text(b"ok\x00", 1000)[2] == "binary"
    assert clean_text(b"\xff\xfe bad", 1000)[2] == "undecodable"
    text, dropped, _ = clean_text(b"short\r\n" + b"y" * 50 + b"\nend", 10)
    assert (text, dropped) == ("short\nend", 1)
    for name, body in [("a.py", "same\n"), ("b.py", "same\n"), ("c.py", "other\n"), ("d.py", "x" * 99)]:
        (tmp_path / name).write_text(body)
    files = collect_files([str(tmp_path)], [], [])
    train, val, stats = load_corpus(files, max_line_chars=50, val_fraction=0.0)
    assert [d.name for d in train] == ["a.py", "c.py"]
    assert (stats.duplicates, stats.skipped_empty, val) == (1, 1, [])


def test_validation_split_is_by_path_and_stable():
    names = [f"dir/file{i}.py" for i in range(2000)]
    held = [n for n in names if is_validation(n, 0.1)]
    assert 150 < len(held) < 250
    assert held == [n for n in names if is_validation(n, 0.1)]
    assert set(held) <= {n for n in names if is_validation(n, 0.3)}


def test_packed_rows_and_epoch_order(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(101, dtype=np.uint16))
    packed = PackedTokens(tmp_path / "t.npy", seq_len=10)
    assert packed.num_rows == 10
    rows = packed.rows(np.array([0, 9]))
    assert rows.tolist() == [list(range(0, 11)), list(range(90, 101))]
    order = RowOrder(packed.num_rows, seed=3)
    first, second = order.take(0, 10), order.take(10, 10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert list(first) != list(second)
    assert list(RowOrder(10, seed=3).take(7, 6)) == list(first[7:]) + list(second[:3])


def test_lr_schedule():
    factors = [lr_factor(s, warmup_steps=10, max_steps=110, min_ratio=0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)  # halfway down the cosine
    assert factors[110] == factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


# ---------------------------------------------------------------- training and export


def test_training_lowers_loss(trained):
    _, summary = trained
    evals = summary["evals"]
    # A fresh model predicts nearly uniformly over the vocabulary.
    assert evals[0]["step"] == 0
    assert evals[0]["loss"] == pytest.approx(math.log(summary["model_config"]["vocab_size"]), abs=0.1)
    assert summary["val_loss"] < evals[0]["loss"] - 1.0
    losses = summary["step_losses"]
    assert len(losses) == 60 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["tokens_seen"] == 60 * 8 * 32
    assert summary["data"]["val_documents"] >= 1 and summary["data"]["vocab_size"] <= VOCAB


def test_export_loads_in_transformers_with_same_logits(trained):
    transformers = pytest.importorskip("transformers")
    from effinfer import LLM

    out, _ = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    llm = LLM(str(out), dtype="float32", device="cpu", show_progress=False)
    ids = llm.tokenizer.encode(SAMPLE)[:32]
    model = llm.engine.runner.model
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits
        ours = model.compute_logits(model.forward_dense(torch.tensor([ids]))).float()
    assert (ours - expected).abs().max().item() < 1e-4
    # A trained model is far from uniform on code like its training data.
    assert (
        torch.nn.functional.cross_entropy(expected[0, :-1], torch.tensor(ids[1:])).item()
        < math.log(VOCAB) - 1
    )


def test_tokenizer_identical_in_effinfer_and_transformers(trained):
    transformers = pytest.importorskip("transformers")
    from effinfer.tokenizer import Tokenizer

    out, _ = trained
    ours = Tokenizer.from_dir(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    texts = [SAMPLE, "", "  tabs\tand\nnewlines\r\n", "ünïcödé 😀 → λ", "text <|endoftext|> more"]
    for text in texts:
        for special in (True, False):
            expected = theirs(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == expected
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode("x")[0] == ours.bos_token_id == theirs.bos_token_id == 0
    assert ours.eos_token_ids == [theirs.eos_token_id] == [0]
    assert ours.model_max_length == theirs.model_max_length == 32


# ---------------------------------------------------------------- resume and data parallelism

SHORT = ["--max-steps", "8", "--warmup-steps", "2", "--lr", "1e-2", "--grad-accum", "2", "--eval-every", "4"]
SHORT += ["--eval-batches", "2", "--save-every", "4", "--tie-embeddings"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = run_train(out, *SHORT, "--batch-size", "4")
    torch.set_num_threads(threads)
    return out, summary


def test_resume_continues_the_same_loss_curve(uninterrupted, tmp_path):
    _, full = uninterrupted
    first = run_train(tmp_path, *SHORT, "--batch-size", "4", "--stop-after", "4")
    assert first["steps"] == 4 and len(first["step_losses"]) == 4
    resumed = run_train(tmp_path, *SHORT, "--batch-size", "4", "--resume")
    assert resumed["steps"] == 8
    np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-6, atol=0)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
    # The curve really moved: a resume that replayed the first steps would not match.
    assert full["step_losses"][4] != pytest.approx(full["step_losses"][0], rel=1e-3)


def test_two_processes_follow_the_single_process_curve(uninterrupted, tmp_path):
    _, single = uninterrupted
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [
        "-m",
        "effinfer.train",
        *corpus_args(),
        *TINY,
        *SHORT,
        "--batch-size",
        "2",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = json.loads((tmp_path / "train_summary.json").read_text())
    assert parallel["hardware"]["processes"] == 2 and parallel["global_batch_rows"] == 8
    np.testing.assert_allclose(parallel["step_losses"], single["step_losses"], rtol=1e-3)
    assert parallel["val_loss"] == pytest.approx(single["val_loss"], rel=1e-3)


def test_bf16_tied_export_and_fine_tuning(uninterrupted, tmp_path):
    transformers = pytest.importorskip("transformers")
    from effinfer import LLM

    source, summary = uninterrupted
    config = json.loads((source / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    llm = LLM(str(source), dtype="float32", device="cpu", show_progress=False)
    ids = torch.tensor([llm.tokenizer.encode(SAMPLE)[:32]])
    model = llm.engine.runner.model
    with torch.no_grad():
        assert (model.compute_logits(model.forward_dense(ids)) - hf(ids).logits).abs().max().item() < 1e-4
    # Fine-tuning starts from the exported weights: its first loss is the trained model's, not log(vocab).
    tuned = run_train(
        tmp_path, "--init", str(source), "--max-steps", "2", "--lr", "1e-4", "--batch-size", "4"
    )
    assert tuned["evals"][0]["loss"] == pytest.approx(summary["val_loss"], abs=0.05)
    assert tuned["model_config"]["tie_word_embeddings"] is True
    assert (tmp_path / "model.safetensors").is_file()
