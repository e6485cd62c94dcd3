"""``effinfer distill --teacher-topk K`` and ``--embedding-from-teacher``: the sparse KD loss against its
definition and against the full loss at K = vocabulary, the cache against transformers' logits, a cached
run against an on-the-fly one, and the SVD embedding against NumPy's SVD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from effinfer.cli import main as cli_main
from effinfer.train.distill import distillation_loss, truncated_svd_rows
from effinfer.train.distill import main as distill_main
from effinfer.train.teacher_topk import (
    CachedTeacher,
    TeacherTopK,
    TeacherTopKCache,
    build_teacher_cache,
    sparse_distillation_loss,
    top_k_log_probs,
)
from tests import test_distill
from tests.test_distill import RUN, STUDENT

# test_distill's fixtures: its forty story files (module-scoped) and the torch thread count kept.
stories_files = test_distill.stories_files
_keep_torch_threads = test_distill._keep_torch_threads


def _through_fp16(teacher: TeacherTopK) -> TeacherTopK:
    """What the cache stores and gives back: float16 log-probabilities, int32 ids, float32 tail."""
    return TeacherTopK(
        teacher.log_probs.half().float(), teacher.ids.int().long(), teacher.tail_log_mass.float()
    )


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("weight, temperature", [(1.0, 1.0), (0.5, 2.0), (0.7, 0.8)])
def test_sparse_loss_with_the_whole_vocabulary_is_the_full_loss(direction, weight, temperature):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 5, 13, generator=generator) * 3).requires_grad_(True)
    teacher = torch.randn(2, 5, 13, generator=generator) * 3
    targets = torch.randint(0, 13, (2, 5), generator=generator)
    cached = _through_fp16(top_k_log_probs(teacher, 13, temperature))
    sparse = sparse_distillation_loss(student, cached, targets, weight, temperature, direction)
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    full = distillation_loss(student, teacher, targets, weight, temperature, direction)
    (full_grad,) = torch.autograd.grad(full, student)
    # float16 log-probabilities: a relative error of ~5e-4 each.
    assert sparse.item() == pytest.approx(full.item(), rel=2e-3)
    assert torch.allclose(sparse_grad, full_grad, atol=2e-3 * full_grad.abs().max().item())


def coarse_reference(student, teacher, targets, k, weight, temperature, direction) -> float:
    """The K + 1-outcome KL written out in float64 NumPy: the teacher's top-K tokens and one tail bucket."""
    s, t = student.double().numpy() / temperature, teacher.double().numpy() / temperature
    p_s = np.exp(s - s.max(-1, keepdims=True))
    p_s /= p_s.sum(-1, keepdims=True)
    p_t = np.exp(t - t.max(-1, keepdims=True))
    p_t /= p_t.sum(-1, keepdims=True)
    top = np.argsort(-p_t, axis=-1)[..., :k]
    q_top, p_top = np.take_along_axis(p_s, top, -1), np.take_along_axis(p_t, top, -1)
    q = np.concatenate([q_top, 1 - q_top.sum(-1, keepdims=True)], -1)
    p = np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1)
    kl = (p * np.log(p / q)).sum(-1) if direction == "forward" else (q * np.log(q / p)).sum(-1)
    raw = student.double().numpy()
    log_z = np.log(np.exp(raw - raw.max(-1, keepdims=True)).sum(-1)) + raw.max(-1)
    cross_entropy = (log_z - np.take_along_axis(raw, targets.numpy()[..., None], -1)[..., 0]).mean()
    return weight * temperature**2 * kl.mean() + (1 - weight) * cross_entropy


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("k, temperature", [(1, 1.0), (4, 2.0), (10, 0.7)])
def test_sparse_loss_is_the_kl_over_top_k_and_a_tail_bucket(direction, k, temperature):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 17, generator=generator) * 2
    teacher = torch.randn(3, 4, 17, generator=generator) * 2
    targets = torch.randint(0, 17, (3, 4), generator=generator)
    cached = top_k_log_probs(teacher, k, temperature)  # float32, no float16 rounding here
    ours = sparse_distillation_loss(student, cached, targets, 0.6, temperature, direction).item()
    expected = coarse_reference(student, teacher, targets, k, 0.6, temperature, direction)
    assert ours == pytest.approx(expected, rel=1e-5)
    # A lower bound of the full KL (data processing): coarsening never adds divergence.
    assert ours <= distillation_loss(student, teacher, targets, 0.6, temperature, direction).item() + 1e-6


def test_top_k_log_probs_keep_the_teacher_mass():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=generator) * 4
    values, ids, tail = top_k_log_probs(logits, 5, 1.5)
    probs = torch.softmax(logits.double() / 1.5, -1)
    assert torch.equal(ids, probs.topk(5, -1).indices)
    assert torch.allclose(values.double(), probs.gather(-1, ids).log(), atol=1e-5)
    assert torch.allclose(
        tail.double().exp() + values.double().exp().sum(-1), torch.ones(6, dtype=torch.double)
    )


# ---------------------------------------------------------------- the cache


def test_cache_holds_the_teacher_top_k_and_round_trips(stories260k, tmp_path):
    transformers = pytest.importorskip("transformers")
    generator = torch.Generator().manual_seed(4)
    rows = torch.randint(3, 512, (5, 48), generator=generator).numpy()
    directory = tmp_path / "cache"
    cache = build_teacher_cache(stories260k, rows, directory, 8, 2.0, threads=1, show_progress=False)
    assert cache.complete
    hf = transformers.AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = top_k_log_probs(hf(torch.from_numpy(rows).long()).logits, 8, 2.0)
    teacher = CachedTeacher(TeacherTopKCache(directory, cache.settings, *cache.shape), rows)  # reopened
    order = [3, 0, 4]  # any order, found by the rows' tokens
    values, ids, tail = teacher(torch.from_numpy(rows[order]).long())
    assert values.dtype == torch.float16 and ids.dtype == torch.int64
    assert torch.allclose(values.float(), expected[0][order], atol=2e-3)
    # Ids agree wherever the teacher's k-th and (k+1)-th probabilities are not tied at float precision.
    assert (ids == expected[1][order]).float().mean() > 0.99
    assert torch.allclose(tail, expected[2][order], atol=1e-4)
    with pytest.raises(ValueError, match="missing from the teacher cache"):
        teacher(torch.from_numpy(rows[:1] + 1).long())


def test_an_interrupted_cache_pass_resumes(stories260k, tmp_path):
    rows = torch.randint(3, 512, (20, 16), generator=torch.Generator().manual_seed(5)).numpy()
    whole = build_teacher_cache(stories260k, rows, tmp_path / "whole", 4, 1.0, show_progress=False)
    partial = TeacherTopKCache(tmp_path / "part", whole.settings, *whole.shape)
    for row in range(17):
        partial.write(
            row,
            TeacherTopK(
                *(torch.from_numpy(np.asarray(whole.arrays[n][row])) for n in TeacherTopKCache.FILES)
            ),
        )
    partial.arrays["values"][17:] = 99  # garbage past the saved progress is overwritten
    partial.flush()
    resumed = build_teacher_cache(stories260k, rows, tmp_path / "part", 4, 1.0, show_progress=False)
    assert resumed.rows_done == 20
    for name in TeacherTopKCache.FILES:
        assert np.array_equal(resumed.arrays[name], whole.arrays[name])
    # Another K is another cache: rebuilt, not reused.
    assert (
        build_teacher_cache(stories260k, rows, tmp_path / "part", 3, 1.0, show_progress=False).shape[2] == 3
    )


# ---------------------------------------------------------------- the command


def test_a_cached_run_with_the_whole_vocabulary_follows_the_on_the_fly_run(
    stories260k, stories_files, tmp_path
):
    flags = ["--data", str(stories_files), "--teacher", str(stories260k), *STUDENT, *RUN]
    flags += [
        "--max-steps",
        "4",
        "--warmup-steps",
        "1",
        "--lr",
        "3e-3",
        "--kd-weight",
        "0.7",
        "--kd-temperature",
        "2",
    ]
    flags += ["--precision", "fp32"]
    assert distill_main([*flags, "--out", str(tmp_path / "live")]) == 0
    assert distill_main([*flags, "--teacher-topk", "512", "--out", str(tmp_path / "cached")]) == 0
    live = json.loads((tmp_path / "live" / "train_summary.json").read_text())
    cached = json.loads((tmp_path / "cached" / "train_summary.json").read_text())
    np.testing.assert_allclose(cached["step_losses"], live["step_losses"], rtol=2e-3)
    meta = json.loads((tmp_path / "cached" / "training" / "teacher-topk" / "meta.json").read_text())
    assert meta["rows_done"] == meta["shape"][0] <= 4 * 4 and meta["shape"][1:] == [64, 512]
    # Adam's first steps follow the gradient's sign, so weights are compared through what they do.
    assert cached["val_loss"] == pytest.approx(live["val_loss"], rel=1e-3)
    # A second run with a smaller K reuses nothing (another cache) and still trains.
    assert distill_main([*flags, "--teacher-topk", "16", "--out", str(tmp_path / "k16")]) == 0
    k16 = json.loads((tmp_path / "k16" / "train_summary.json").read_text())
    assert k16["step_losses"][0] < cached["step_losses"][0]  # the coarse KL is the smaller one


def test_truncated_svd_rows_is_the_best_rank_r_factor():
    matrix = torch.randn(40, 12, generator=torch.Generator().manual_seed(6))
    ours = truncated_svd_rows(matrix, 5).double().numpy()
    u, s, _ = np.linalg.svd(matrix.double().numpy(), full_matrices=False)
    expected = u[:, :5] * s[:5]
    # Columns are defined up to their sign; the Gram matrix of the rows is not.
    np.testing.assert_allclose(ours @ ours.T, expected @ expected.T, atol=1e-5)  # float32 out
    np.testing.assert_allclose(np.abs(ours), np.abs(expected), atol=1e-5)


def test_embedding_from_teacher_starts_the_student_from_the_svd(stories260k, stories_files, tmp_path):
    flags = ["--data", str(stories_files), "--teacher", str(stories260k), *STUDENT, *RUN, "--kd-weight", "0"]
    flags += ["--max-steps", "1", "--lr", "1e-9", "--weight-decay", "0", "--embedding-from-teacher"]
    assert distill_main([*flags, "--out", str(tmp_path / "out")]) == 0
    student = load_file(tmp_path / "out" / "model.safetensors")
    teacher = load_file(stories260k / "model.safetensors")["model.embed_tokens.weight"]
    expected = truncated_svd_rows(teacher.float(), 32)
    assert torch.allclose(student["model.embed_tokens.weight"], expected, atol=1e-5)
    assert torch.allclose(student["lm_head.weight"], expected, atol=1e-5)  # an untied student: the same


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher-topk", "0"], "--teacher-topk must be at least 1, got 0"),
        (["--teacher-topk", "600"], "--teacher-topk 600 exceeds the teacher's vocabulary of 512"),
        (
            ["--teacher-topk", "8", "--hidden-weight", "1"],
            "--hidden-weight needs the teacher's hidden states",
        ),
    ],
)
def test_bad_cache_options_are_one_line_errors(extra, message, stories260k, stories_files, tmp_path, capsys):
    argv = ["distill", "--teacher", str(stories260k), "--data", str(stories_files), "--out", str(tmp_path)]
    assert cli_main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "training").exists()


def test_embedding_from_teacher_refuses_a_given_student(stories260k, stories_files, tmp_path, capsys):
    argv = [
        "distill",
        "--teacher",
        str(stories260k),
        "--data",
        str(stories_files),
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main([*argv, "--student", str(stories260k), "--embedding-from-teacher"]) == 2
    assert "--embedding-from-teacher initialises a fresh student" in capsys.readouterr().err
