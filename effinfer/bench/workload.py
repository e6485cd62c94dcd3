"""Benchmark workloads: seeded random token-id prompts with chosen output lengths (as nano-vllm's bench.py).

Token values do not change the cost of a forward pass, so random ids stand in for real text;
every request ignores EOS, so it produces exactly its output length on every engine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Ids below this are often special (unk, bos, eos); prompts avoid them.
_FIRST_TOKEN_ID = 10


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_output_len(self) -> int:
        return max(self.output_lens)


def parse_range(text: str) -> tuple[int, int]:
    """``"32:256"`` -> (32, 256), inclusive; ``"64"`` -> (64, 64)."""
    low, sep, high = str(text).partition(":")
    try:
        lo, hi = int(low), int(high) if sep else int(low)
    except ValueError:
        raise ValueError(f"expected a length or a range LOW:HIGH, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"a length range needs 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(_FIRST_TOKEN_ID, vocab_size) for _ in range(length)]


def random_workload(
    name: str,
    rng: random.Random,
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
) -> Workload:
    """``num_requests`` prompts of uniform random length in ``input_len``, each wanting a uniform random
    number of output tokens in ``output_len`` (both ranges inclusive)."""
    prompt_lens = [rng.randint(*input_len) for _ in range(num_requests)]
    output_lens = [rng.randint(*output_len) for _ in range(num_requests)]
    prompts = [random_prompt(rng, n, vocab_size) for n in prompt_lens]
    return Workload(name, prompts, output_lens)
