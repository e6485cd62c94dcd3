"""The fused operators' tests (tests/test_triton_ops.py) on a machine without a GPU, under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels, so the interpreted
run is a pytest of its own in a subprocess (``run_interpreted``, which tests/test_triton_interpreter.py
also uses for the quantized kernels). Every test there must run and pass; on a machine with CUDA
they run natively instead, and this one skips.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from effinfer.kernels.cpu.build import REQUIRE_SWITCH
from tests.conftest import REPO_ROOT


def run_interpreted(test_file: str, report: Path, pytest_args: tuple[str, ...] = ()) -> tuple[int, str, dict]:
    """Run ``test_file`` under ``TRITON_INTERPRET=1`` in a subprocess (skips the calling test when triton
    is missing, fails it when CI requires the kernels' tests): (exit status, output tail, outcomes),
    outcomes mapping each test case to the subset of {skipped, failure, error} it ended with."""
    if importlib.util.find_spec("triton") is None:
        if os.environ.get(REQUIRE_SWITCH) == "1":  # CI: the test extra installs triton
            pytest.fail(f"triton is not installed, and {REQUIRE_SWITCH}=1 requires the Triton kernels' tests")
        pytest.skip("triton is not installed")
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "pytest", "-q", *pytest_args, "-p", "no:cacheprovider"]
    command += ["--tb=short", "-rfEs", f"--junitxml={report}", test_file]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    output = (run.stdout + run.stderr)[-8000:]
    cases = ET.parse(report).getroot().iter("testcase") if report.is_file() else []
    outcomes = {
        case.get("name"): {child.tag for child in case} & {"skipped", "failure", "error"} for case in cases
    }
    return run.returncode, output, outcomes


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with CUDA, test_triton_ops.py runs the kernels natively"
)
def test_fused_operators_match_references_under_the_interpreter(tmp_path):
    returncode, output, outcomes = run_interpreted("tests/test_triton_ops.py", tmp_path / "interpreted.xml")
    assert returncode == 0, output
    not_run = [name for name, tags in outcomes.items() if tags]
    assert not not_run, f"fused-operator tests not run under the interpreter: {not_run}\n{output}"
    names = {name.split("[")[0] for name in outcomes}
    assert {
        "test_paged_decode_attention_matches_reference",
        "test_varlen_prefill_attention_matches_reference",
    } <= names
