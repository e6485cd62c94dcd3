"""The Triton kernels' tests (tests/test_gpu_quant.py) on a machine without a GPU, under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels, and would change
how any later Triton import behaves, so the interpreted run is a pytest of its own in a
subprocess: nothing leaks into this session. Every kernel test must pass there; only those that
need CUDA itself (quant_linear's dispatch to Triton, fp8 tensor cores, whole models on the GPU)
may skip. On a machine with CUDA the same tests run natively instead, and this one skips.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_triton_interpreted_ops import run_interpreted

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
    returncode, output, outcomes = run_interpreted(
        "tests/test_gpu_quant.py", tmp_path / "interpreted.xml", ("-m", "gpu")
    )
    assert returncode == 0, output
    ran = [name for name, tags in outcomes.items() if not tags]
    skipped = {name.split("[")[0] for name, tags in outcomes.items() if tags}
    assert skipped <= NEED_CUDA, (
        f"kernel tests skipped under the interpreter: {skipped - NEED_CUDA}\n{output}"
    )
    assert any(name.startswith("test_woq_matches_reference[") for name in ran), output
    assert any(name.startswith("test_codebook_matches_reference[") for name in ran), output
