"""effinfer: an LLM inference engine and compression toolkit.

from effinfer import LLM, SamplingParams
llm = LLM("path/to/hf-model")
print(llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text)
"""

from effinfer.config import ConfigError, EngineConfig
from effinfer.engine.engine import LLMEngine, PromptError
from effinfer.engine.llm import LLM
from effinfer.outputs import CompletionOutput, Logprob, RequestOutput
from effinfer.sampling_params import InvalidSamplingParams, SamplingParams

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
