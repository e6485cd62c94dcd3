"""``effinfer distill``: the KD loss against its definition, ``--kd-weight 0`` as exactly ``effinfer train``,
a distilled stories260K student that effinfer and transformers load, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from effinfer.cli import main as cli_main
from effinfer.train import main as train_main
from effinfer.train.distill import distillation_loss, hidden_state_loss
from effinfer.train.distill import main as distill_main

STUDENT = [
    "--hidden-size", "32",
    "--layers", "2",
    "--heads", "4",
    "--kv-heads", "2",
    "--intermediate-size", "64",
]  # fmt: skip
RUN = [
    "--seq-len", "64",
    "--batch-size", "4",
    "--val-fraction", "0.2",
    "--eval-every", "0",
    "--eval-batches", "2",
    "--save-every", "0",
    "--threads", "1",
    "--save-dtype", "float32",
    "--seed", "3",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stories_files(shared_data, tmp_path_factory) -> Path:
    """Forty TinyStories validation stories, one file each (the training split holds out files)."""
    text = (shared_data / "text" / "tinystories_valid.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("\n\n") if s.strip()][:40]
    directory = tmp_path_factory.mktemp("stories")
    for i, story in enumerate(stories):
        (directory / f"story{i:02d}.txt").write_text(story + "\n")
    return directory


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


# ---------------------------------------------------------------- the loss, from its definition


def reference_loss(student, teacher, targets, weight, temperature, direction) -> float:
    """Hinton et al. / MiniLLM written out in float64 numpy: softmax at T, KL summed over the vocabulary."""
    s, t = student.double().numpy() / temperature, teacher.double().numpy() / temperature
    p_s = np.exp(s - s.max(-1, keepdims=True))
    p_s /= p_s.sum(-1, keepdims=True)
    p_t = np.exp(t - t.max(-1, keepdims=True))
    p_t /= p_t.sum(-1, keepdims=True)
    if direction == "forward":
        kl = (p_t * np.log(p_t / p_s)).sum(-1)
    else:
        kl = (p_s * np.log(p_s / p_t)).sum(-1)
    raw = student.double().numpy()
    log_z = np.log(np.exp(raw - raw.max(-1, keepdims=True)).sum(-1)) + raw.max(-1)
    picked = np.take_along_axis(raw, targets.numpy()[..., None], -1)[..., 0]
    cross_entropy = (log_z - picked).mean()
    return weight * temperature**2 * kl.mean() + (1 - weight) * cross_entropy


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("weight, temperature", [(1.0, 1.0), (0.5, 2.0), (0.3, 0.7), (0.0, 3.0)])
def test_kd_loss_matches_the_definition(direction, weight, temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=generator) * 3
    teacher = torch.randn(2, 5, 11, generator=generator) * 3
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    ours = distillation_loss(student, teacher, targets, weight, temperature, direction).item()
    expected = reference_loss(student, teacher, targets, weight, temperature, direction)
    assert ours == pytest.approx(expected, rel=1e-5)


def test_kd_loss_direction_and_temperature_matter():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator) * 4
    targets = torch.zeros(3, dtype=torch.long)
    forward = distillation_loss(student, teacher, targets, 1.0, 1.0, "forward").item()
    reverse = distillation_loss(student, teacher, targets, 1.0, 1.0, "reverse").item()
    assert forward > 0 and reverse > 0 and abs(forward - reverse) > 0.05
    # A student that matches the teacher has no KL left, only its cross-entropy share.
    assert distillation_loss(teacher, teacher, targets, 1.0, 2.0).item() == pytest.approx(0, abs=1e-6)
    # T² keeps the soft-target gradient on the hard targets' scale (Hinton et al. §2): at high T the
    # gradient tends to (z_s - z_t) / vocab for zero-mean logits, whatever T is.
    for temperature in (100.0, 400.0):
        z_s = (student - student.mean(-1, keepdim=True)).requires_grad_(True)
        z_t = teacher - teacher.mean(-1, keepdim=True)
        distillation_loss(z_s, z_t, targets, 1.0, temperature).backward()
        expected = (z_s - z_t).detach() / 7 / 3  # mean over the 3 positions
        assert (z_s.grad - expected).abs().max() < 0.03 * expected.abs().max()


def test_hidden_state_loss_is_the_mse_through_the_projection():
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 6, generator=generator)
    projection = torch.nn.Linear(4, 6, bias=False)
    weight = projection.weight.detach().double().numpy()
    expected = ((student.double().numpy() @ weight.T - teacher.double().numpy()) ** 2).mean()
    assert hidden_state_loss(student, teacher, projection).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- the command


def test_kd_weight_zero_is_exactly_effinfer_train(stories260k, stories_files, tmp_path):
    flags = ["--data", str(stories_files), *RUN, "--max-steps", "3", "--warmup-steps", "1", "--lr", "1e-3"]
    assert train_main([*flags, "--init", str(stories260k), "--out", str(tmp_path / "train")]) == 0
    command = [*flags, "--teacher", str(stories260k), "--student", str(stories260k), "--kd-weight", "0"]
    assert distill_main([*command, "--out", str(tmp_path / "distill")]) == 0
    plain, baseline = summary(tmp_path / "train"), summary(tmp_path / "distill")
    assert baseline["step_losses"] == plain["step_losses"] and baseline["val_loss"] == plain["val_loss"]
    weights = load_file(tmp_path / "distill" / "model.safetensors")
    expected = load_file(tmp_path / "train" / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    # Training really moved every weight, the decoder's Linears included (a finalized Linear, whose kernel
    # copy is outside autograd, once kept them frozen): these are not two untouched copies of stories260K.
    original = load_file(stories260k / "model.safetensors")
    frozen = [name for name, tensor in original.items() if torch.equal(tensor, expected[name])]
    assert frozen == []


def kl_to_teacher(student_dir: Path, teacher_dir: Path, ids: list[int]) -> float:
    from effinfer import LLM

    logits = []
    for directory in (teacher_dir, student_dir):
        model = LLM(str(directory), dtype="float32", device="cpu", show_progress=False).engine.runner.model
        with torch.no_grad():
            logits.append(model.compute_logits(model.forward_dense(torch.tensor([ids])))[0].float())
    teacher, student = (torch.log_softmax(z, -1) for z in logits)
    return (teacher.exp() * (teacher - student)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def distilled(stories260k, stories_files, tmp_path_factory) -> tuple[Path, Path]:
    """The same fresh student after 40 steps distilled from stories260K, and with --kd-weight 0."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("distilled")
    flags = ["--data", str(stories_files), "--teacher", str(stories260k), *STUDENT, *RUN]
    flags += ["--max-steps", "40", "--warmup-steps", "4", "--lr", "1e-2"]
    assert (
        distill_main([*flags, "--kd-weight", "0.8", "--kd-temperature", "2", "--out", str(root / "kd")]) == 0
    )
    assert distill_main([*flags, "--kd-weight", "0", "--out", str(root / "base")]) == 0
    torch.set_num_threads(threads)
    return root / "kd", root / "base"


def test_distilled_student_loads_in_effinfer_and_transformers(distilled, stories260k):
    transformers = pytest.importorskip("transformers")
    from effinfer import LLM

    out, _ = distilled
    assert (out / "tokenizer.json").read_bytes() == (stories260k / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512 and config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    text = "Once upon a time, there was a little dog named Spot."
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    llm = LLM(str(out), dtype="float32", device="cpu", show_progress=False)
    ids = llm.tokenizer.encode(text)
    assert (
        ids
        == hf_tokenizer(text)["input_ids"]
        == LLM(str(stories260k), show_progress=False).tokenizer.encode(text)
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = llm.engine.runner.model
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits
        ours = model.compute_logits(model.forward_dense(torch.tensor([ids]))).float()
    assert (ours - expected).abs().max().item() < 1e-4


def test_distillation_pulls_the_student_towards_the_teacher(distilled, stories260k, shared_data):
    out, base = distilled
    kd, plain = summary(out), summary(base)
    assert kd["config"]["kd_weight"] == 0.8 and plain["config"]["kd_weight"] == 0.0
    assert kd["tokens_seen"] == plain["tokens_seen"] == 40 * 4 * 64
    # Held-out text from the end of the file, which the training stories (the first forty) do not include.
    text = (shared_data / "text" / "tinystories_valid.txt").read_text(encoding="utf-8")[-4000:]
    from effinfer.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(stories260k).encode(text)[:64]  # the students were trained at --seq-len 64
    assert kl_to_teacher(out, stories260k, ids) < kl_to_teacher(base, stories260k, ids) - 0.05


def test_gguf_teacher_gives_the_same_run_as_its_hf_twin(shared_data, stories260k, stories_files, tmp_path):
    gguf = shared_data / "stories260K" / "stories260K.gguf"
    if not gguf.is_file():
        pytest.skip("stories260K.gguf is not present")
    flags = ["--data", str(stories_files), *STUDENT, *RUN, "--max-steps", "3", "--kd-weight", "1"]
    assert distill_main([*flags, "--teacher", str(gguf), "--out", str(tmp_path / "gguf")]) == 0
    assert distill_main([*flags, "--teacher", str(stories260k), "--out", str(tmp_path / "hf")]) == 0
    from_gguf, from_hf = summary(tmp_path / "gguf"), summary(tmp_path / "hf")
    # The GGUF's vocabulary, written out as tokenizer.json, encodes the data to the very same tokens.
    assert from_gguf["data"]["train_tokens"] == from_hf["data"]["train_tokens"]
    assert np.array_equal(
        np.load(tmp_path / "gguf" / "training" / "data" / "train.npy"),
        np.load(tmp_path / "hf" / "training" / "data" / "train.npy"),
    )
    np.testing.assert_allclose(from_gguf["step_losses"], from_hf["step_losses"], rtol=1e-4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kd-weight", "1.5"], "--kd-weight must be in [0, 1], got 1.5"),
        (["--kd-weight", "-0.1"], "--kd-weight must be in [0, 1]"),
        (["--kd-temperature", "0"], "--kd-temperature must be positive, got 0.0"),
        (["--seq-len", "1024"], "--seq-len 1024 exceeds the teacher's context of 512 tokens"),
    ],
)
def test_bad_values_are_one_line_errors(extra, message, stories260k, stories_files, tmp_path, capsys):
    argv = ["distill", "--teacher", str(stories260k), "--data", str(stories_files), "--out", str(tmp_path)]
    assert cli_main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "training").exists()  # refused before any work


def test_missing_teacher_and_foreign_student_vocabulary(stories260k, stories_files, tmp_path, capsys):
    argv = ["distill", "--data", str(stories_files), "--out", str(tmp_path / "out")]
    assert cli_main([*argv, "--teacher", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--teacher {str(tmp_path / 'nowhere')!r} does not exist" in err and len(err.splitlines()) == 1
    student = tmp_path / "student"
    shutil.copytree(stories260k, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "vocab_size": 320}))
    assert cli_main([*argv, "--teacher", str(stories260k), "--student", str(student)]) == 2
    err = capsys.readouterr().err.strip()
    assert "vocabulary of 320 tokens" in err and "512" in err and len(err.splitlines()) == 1


def test_hidden_matching_trains_and_checkpoints_its_projection(stories260k, stories_files, tmp_path):
    flags = ["--data", str(stories_files), "--teacher", str(stories260k), *STUDENT, *RUN, "--max-steps", "4"]
    flags += ["--warmup-steps", "1", "--lr", "1e-2", "--kd-weight", "0.5", "--hidden-weight", "1"]
    assert distill_main([*flags, "--out", str(tmp_path / "full")]) == 0
    assert distill_main([*flags, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert distill_main([*flags, "--out", str(tmp_path / "split"), "--resume"]) == 0
    full, resumed = summary(tmp_path / "full"), summary(tmp_path / "split")
    # The projection (student width 32 -> teacher width 64) lives in the checkpoint, so a resumed run
    # continues the very same curve; it is no part of the exported model.
    np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-6, atol=0)
    state = torch.load(tmp_path / "full" / "training" / "checkpoint.pt", weights_only=True)
    assert state["objective"]["projection.weight"].shape == (64, 32)
    assert not any("projection" in name for name in load_file(tmp_path / "full" / "model.safetensors"))


def test_two_processes_follow_the_single_process_curve(stories260k, stories_files, tmp_path):
    flags = ["--data", str(stories_files), "--teacher", str(stories260k), *STUDENT, *RUN, "--max-steps", "4"]
    flags += ["--warmup-steps", "1", "--lr", "1e-2", "--kd-weight", "0.7", "--kd-temperature", "2"]
    assert distill_main([*flags, "--out", str(tmp_path / "single")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "effinfer.train.distill", *flags, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, parallel = summary(tmp_path / "single"), summary(tmp_path / "ddp")
    assert parallel["hardware"]["processes"] == 2 and parallel["global_batch_rows"] == 4
    np.testing.assert_allclose(parallel["step_losses"], single["step_losses"], rtol=1e-4)
