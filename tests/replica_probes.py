"""Functions the server tests run inside an engine's process (``DataParallelEngine.run_on_replica``).

A replica unpickles a function by importing its module, so they live here, away from the test
modules' heavy imports (openai, httpx, the app), which each replica would otherwise load first.
"""

from __future__ import annotations

import os

import torch

from effinfer import EngineConfig, LLMEngine


def fail_step_once(engine: LLMEngine, at_call: int) -> None:
    """Make ``engine.step`` raise on its ``at_call``-th call from now."""
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == at_call:
            raise RuntimeError("injected fault")
        return real_step()

    engine.step = flaky_step


def restore_step(engine: LLMEngine) -> None:
    engine.__dict__.pop("step", None)


def replica_placement(engine: LLMEngine) -> tuple[list[int], int, EngineConfig]:
    """The cores the process may run on, its torch threads, and the engine's config."""
    return sorted(os.sched_getaffinity(0)), torch.get_num_threads(), engine.config
