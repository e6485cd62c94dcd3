"""The CPU decode plan (models/cpu_decode_plan.py) runs the same kernels as the modules, call for call."""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.kernels.cpu import fused
from effinfer.models import cpu_decode_plan

from .conftest import cpu_kernel_missing, make_hf_model

requires_fused = pytest.mark.skipif(
    cpu_kernel_missing(fused.extension), reason="fused CPU ops unavailable here"
)

PROMPTS = [[1] + list(range(40, 63)), [1, 400, 7], [1] + list(range(100, 140, 3))]


def decode_logprobs(llm: LLM) -> list[tuple[list[int], list[dict]]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


@requires_fused
@pytest.mark.parametrize(
    "arch, extra",
    [
        ("LlamaForCausalLM", {}),
        ("Qwen2ForCausalLM", {}),  # q/k/v bias
        ("MistralForCausalLM", {"sliding_window": 16}),  # a window in the decode kernel
    ],
)
def test_plan_decodes_exactly_as_the_modules(arch, extra, tmp_path, monkeypatch):
    """Three sequences decoded together, bf16: the same tokens and the same top-5 log-probabilities
    to the last bit, with the plan and with the modules (the plan must have run)."""
    _, path = make_hf_model(arch, tmp_path, **extra)
    planned = []
    run = cpu_decode_plan.CpuDecodePlan.run
    monkeypatch.setattr(
        cpu_decode_plan.CpuDecodePlan, "run", lambda *a: planned.append(out := run(*a)) or out
    )
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv(cpu_decode_plan.SWITCH, switch)
        llm = LLM(str(path), dtype="bfloat16", device="cpu", show_progress=False, enable_prefix_caching=False)
        runs.append(decode_logprobs(llm))
        assert (llm.engine.runner.decode_plan is not None) == (switch == "1")
    assert runs[0] == runs[1]
    assert len(planned) == 11 and all(h is not None for h in planned)  # every decode step of the first run


@requires_fused
def test_plan_is_not_made_where_it_cannot_run(tmp_path):
    _, path = make_hf_model("Qwen3ForCausalLM", tmp_path)  # q/k norms
    llm = LLM(str(path), dtype="bfloat16", device="cpu", show_progress=False)
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3))
    assert llm.engine.runner.decode_plan is None
    _, path = make_hf_model("LlamaForCausalLM", tmp_path / "f32")
    llm = LLM(str(path), dtype="float32", device="cpu", show_progress=False)
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3))
    assert llm.engine.runner.decode_plan is None


@requires_fused
def test_a_hooked_projection_still_runs_its_hook(tmp_path):
    """A profiler's timer on a projection (an instance ``forward``) is kept by the plan."""
    _, path = make_hf_model("LlamaForCausalLM", tmp_path)
    llm = LLM(str(path), dtype="bfloat16", device="cpu", show_progress=False)
    calls = []
    down = llm.engine.model.model.layers[1].mlp.down_proj
    forward = down.forward
    down.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert llm.engine.runner.decode_plan is not None
    assert calls == [len(PROMPTS[1]), 1, 1, 1]  # the prefill, then three decode steps through the plan
    assert torch.is_grad_enabled()
