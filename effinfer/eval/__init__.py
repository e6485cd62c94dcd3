"""Quality evaluation: perplexity over a text with a sliding window."""

from effinfer.eval.perplexity import EvalError, PerplexityResult, perplexity

__all__ = ["perplexity", "PerplexityResult", "EvalError"]
