"""effinfer: an LLM inference engine and compression toolkit.

from effinfer import LLM, SamplingParams
llm = LLM("path/to/hf-model")
print(llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text)

Packages sit on floors, and a module never imports a higher floor (``lint-imports``, contract in
pyproject.toml; docs/quantization-schemes.md): quant < config < machine | sampling_params |
outputs | tokenizer | default_model < kernels < layers < models < loading < compress | convert <
engine < eval < serve | train < bench < cli.
"""

import os

# Weights are streamed from memory every decode step; 2 MiB pages spare the TLB misses of 4 KiB
# ones (measured ~3% faster decode). PyTorch's CPU allocator reads this before its first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from effinfer import spec  # noqa: E402, F401  (registers speculative decoding with the engine)
from effinfer.config import ConfigError, EngineConfig  # noqa: E402
from effinfer.engine.engine import LLMEngine, PromptError  # noqa: E402
from effinfer.engine.llm import LLM  # noqa: E402
from effinfer.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from effinfer.sampling_params import InvalidSamplingParams, SamplingParams  # noqa: E402

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "EngineConfig",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "ConfigError",
    "PromptError",
    "InvalidSamplingParams",
]
__version__ = "0.1.0"
