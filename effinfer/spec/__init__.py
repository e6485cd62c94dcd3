"""Speculative decoding: cheap proposers guess the next tokens, the target checks them in one step.

Papers: Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and
Chen et al. 2023 ("Accelerating LLM Decoding with Speculative Sampling") for the lossless
acceptance rule; Saxena 2023 (prompt lookup decoding) for the n-gram proposer.
Idea: decoding is memory-bound, so scoring k+1 positions costs about what one does; a proposer
guesses k tokens, the target scores them all in one step and keeps the longest prefix that the
rejection rule accepts, plus one token of its own, so the output distribution is the target's.
Switch on: ``LLM(model, speculative_model="ngram" or a draft model's path, num_speculative_tokens=4)``
or ``--speculative-model`` / ``--num-speculative-tokens`` on the command line.
"""

from effinfer.engine.speculation import register_speculator_factory
from effinfer.spec.speculator import SpeculativeDecoder

register_speculator_factory(SpeculativeDecoder)

__all__ = ["SpeculativeDecoder"]
