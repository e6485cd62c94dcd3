"""The fused operators' tests (tests/test_triton_ops.py) on a machine without a GPU, under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels, so the interpreted
run is a pytest of its own in a subprocess (as tests/test_triton_interpreter.py does for the
quantized kernels). Every test there must run and pass; on a machine with CUDA they run natively
instead, and this one skips.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from effinfer.kernels.cpu.build import REQUIRE_SWITCH
from tests.conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with CUDA, test_triton_ops.py runs the kernels natively"
)
def test_fused_operators_match_references_under_the_interpreter(tmp_path):
    if importlib.util.find_spec("triton") is None:
        if os.environ.get(REQUIRE_SWITCH) == "1":  # CI: the test extra installs triton
            pytest.fail(f"triton is not installed, and {REQUIRE_SWITCH}=1 requires the Triton kernels' tests")
        pytest.skip("triton is not installed")
    report = tmp_path / "interpreted.xml"
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "-rfEs"]
    command += [f"--junitxml={report}", "tests/test_triton_ops.py"]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    output = (run.stdout + run.stderr)[-8000:]
    assert run.returncode == 0, output
    cases = list(ET.parse(report).getroot().iter("testcase"))
    not_run = [
        case.get("name")
        for case in cases
        if any(child.tag in ("skipped", "failure", "error") for child in case)
    ]
    assert not not_run, f"fused-operator tests not run under the interpreter: {not_run}\n{output}"
    names = {case.get("name").split("[")[0] for case in cases}
    assert {
        "test_paged_decode_attention_matches_reference",
        "test_varlen_prefill_attention_matches_reference",
    } <= names
