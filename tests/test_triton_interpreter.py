"""The Triton kernels' tests (tests/test_gpu_quant.py) on a machine without a GPU, under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels, and would change
how any later Triton import behaves, so the interpreted run is a pytest of its own in a
subprocess: nothing leaks into this session. Every kernel test must pass there; only those that
need CUDA itself (quant_linear's dispatch to Triton, fp8 tensor cores, whole models on the GPU)
may skip. On a machine with CUDA the same tests run natively instead, and this one skips.
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

# Tests of tests/test_gpu_quant.py that need a CUDA device itself, not only Triton.
NEED_CUDA = {
    "test_linear_dispatches_to_triton",
    "test_fp8_matches_reference",
    "test_quantized_model_logits_match_reference",
    "test_int4_greedy_on_cuda_equals_cpu",
}


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with CUDA, test_gpu_quant.py runs the kernels natively"
)
def test_triton_kernels_match_references_under_the_interpreter(tmp_path):
    if importlib.util.find_spec("triton") is None:
        if os.environ.get(REQUIRE_SWITCH) == "1":  # CI: the test extra installs triton
            pytest.fail(f"triton is not installed, and {REQUIRE_SWITCH}=1 requires the Triton kernels' tests")
        pytest.skip("triton is not installed")
    report = tmp_path / "interpreted.xml"
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    command += ["--tb=short", "-rfEs", f"--junitxml={report}", "tests/test_gpu_quant.py"]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    output = (run.stdout + run.stderr)[-8000:]
    assert run.returncode == 0, output
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {
        case.get("name"): {child.tag for child in case} & {"skipped", "failure", "error"} for case in cases
    }
    ran = [name for name, tags in outcomes.items() if not tags]
    skipped = {name.split("[")[0] for name, tags in outcomes.items() if tags}
    assert skipped <= NEED_CUDA, (
        f"kernel tests skipped under the interpreter: {skipped - NEED_CUDA}\n{output}"
    )
    assert any(name.startswith("test_woq_matches_reference[") for name in ran), output
    assert any(name.startswith("test_codebook_matches_reference[") for name in ran), output
