"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019).

Idea: split each weight so that a decoder layer needs two all-reduces and nothing else. q/k/v and
gate/up are column-parallel (each rank computes its heads / its slice of the MLP's inner width),
o and down are row-parallel (each rank multiplies its slice of the inner width, an all-reduce sums
the partial results); the embedding and the output head split the vocabulary (an all-reduce after
the lookup, an all-gather of the logits). A rank holds only its shard; ``tp_split`` tells the
loaders which slice of each checkpoint tensor that is, so nothing else is read.

Grouped KV heads stay with the query heads that use them; with fewer KV heads than ranks each
rank keeps the one KV head its query heads use (replicated, as vLLM does).

Switch it on with ``LLM(model, tensor_parallel_size=N)`` or ``--tensor-parallel-size N``. In one
process every constructor here returns the plain layer, so nothing changes and nothing is paid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effinfer import distributed
from effinfer.config import ConfigError
from effinfer.layers.linear import Linear
from effinfer.quant.affine import AffineGroupWeight
from effinfer.quant.base import CompressedWeight
from effinfer.quant.integer import QuantizedWeight


@dataclass(frozen=True)
class TensorSplit:
    """The part of a checkpoint tensor this rank holds: ``[start, stop)`` along ``dim``."""

    dim: int  # 0: output features (rows), 1: input features (columns)
    start: int
    stop: int


@dataclass(frozen=True)
class HeadSplit:
    """This rank's attention heads: query heads ``[q_start, q_start + num_heads)``, KV heads likewise."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def head_split(
    num_heads: int, num_kv_heads: int, tp_size: int | None = None, tp_rank: int | None = None
) -> HeadSplit:
    """Query and KV heads of one rank; a size that does not fit the head counts is a ``ConfigError``."""
    tp = distributed.tp_size() if tp_size is None else tp_size
    rank = distributed.tp_rank() if tp_rank is None else tp_rank
    kv_fits = num_kv_heads % tp == 0 if tp <= num_kv_heads else tp % num_kv_heads == 0
    if num_heads % tp or not kv_fits:
        raise ConfigError(
            f"tensor parallel size {tp} does not fit the model's {num_heads} query / {num_kv_heads} KV heads: "
            f"it must divide {num_heads} and divide {num_kv_heads} or be a multiple of it"
        )
    heads = num_heads // tp
    if tp <= num_kv_heads:
        kv_heads = num_kv_heads // tp
        return HeadSplit(rank * heads, heads, rank * kv_heads, kv_heads)
    return HeadSplit(rank * heads, heads, rank // (tp // num_kv_heads), 1)


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> None:
    """Refuse, before any process starts, a tensor-parallel size the model's shapes cannot take."""
    head_split(num_heads, num_kv_heads, tp_size, 0)
    if intermediate_size % tp_size:
        raise ConfigError(
            f"tensor parallel size {tp_size} does not divide the MLP's intermediate size {intermediate_size}"
        )


def _even(total: int, rank: int, tp: int) -> tuple[int, int]:
    size = total // tp
    return rank * size, (rank + 1) * size


class ColumnParallelLinear(Linear):
    """Output rows split over ranks; ``row_ranges``: per fused checkpoint tensor, this rank's rows of it.

    ``vocab_ranges``: every rank's rows of a vocabulary-parallel output head, whose outputs are
    gathered (ranks may hold one row more than others when the vocabulary does not divide).
    """

    def __init__(
        self,
        in_features: int,
        row_ranges: list[tuple[int, int]],
        bias: bool = False,
        vocab_ranges: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(in_features, [stop - start for start, stop in row_ranges], bias)
        self.row_ranges = row_ranges
        self.vocab_ranges = vocab_ranges

    def tp_split(self, param_name: str, shard: int) -> TensorSplit:
        start, stop = self.row_ranges[shard]
        return TensorSplit(0, start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.vocab_ranges is None:
            return y
        widest = max(stop - start for start, stop in self.vocab_ranges)
        parts = distributed.tp_all_gather(F.pad(y, (0, widest - y.shape[-1])), dim=-1).split(widest, dim=-1)
        return torch.cat(
            [part[..., : stop - start] for part, (start, stop) in zip(parts, self.vocab_ranges)], -1
        )


class RowParallelLinear(Linear):
    """Input columns split over ranks; the partial products are summed by an all-reduce."""

    def __init__(self, in_features: int, out_features: int) -> None:
        tp, rank = distributed.tp_size(), distributed.tp_rank()
        super().__init__(in_features // tp, out_features)
        self.column_range = _even(in_features, rank, tp)

    def tp_split(self, param_name: str, shard: int) -> TensorSplit:
        return TensorSplit(1, *self.column_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.tp_all_reduce(super().forward(x))

    def quantize_whole_rows(self, quantize: Callable[[torch.Tensor], CompressedWeight]) -> CompressedWeight:
        """Quantize as one process would, then keep this rank's columns: a per-row scale sees the
        whole row (the ranks gather it once, at load), so the codes are exactly the unsplit ones."""
        full = distributed.tp_all_gather(self.dequantized_weight().contiguous(), dim=1)
        start, stop = self.column_range
        return weight_columns(quantize(full), start, stop)


class VocabParallelEmbedding(nn.Embedding):
    """Each rank looks up the tokens of its vocabulary slice; the others contribute zeros to the all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        self.vocab_start, self.vocab_stop = vocab_ranges(vocab_size)[distributed.tp_rank()]
        super().__init__(self.vocab_stop - self.vocab_start, hidden_size)

    def tp_split(self, param_name: str, shard: int) -> TensorSplit:
        return TensorSplit(0, self.vocab_start, self.vocab_stop)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_stop)
        local = torch.where(mine, input_ids - self.vocab_start, 0)
        x = super().forward(local) * mine.unsqueeze(-1).to(self.weight.dtype)
        return distributed.tp_all_reduce(x)


def vocab_ranges(vocab_size: int) -> list[tuple[int, int]]:
    """Each rank's rows of the embedding and the output head (as even as the vocabulary allows)."""
    tp = distributed.tp_size()
    return [(r * vocab_size // tp, (r + 1) * vocab_size // tp) for r in range(tp)]


def weight_columns(weight: CompressedWeight, start: int, stop: int) -> CompressedWeight:
    """Input columns ``[start, stop)`` of a quantized weight, cut between its groups (never through one)."""
    if isinstance(weight, QuantizedWeight) and weight.g_idx is None:
        group = weight.group_size
        if group >= weight.in_features:  # one scale per row: every column keeps it
            return QuantizedWeight(
                weight.qweight[:, start:stop], weight.scales, weight.zeros, weight.bits, stop - start
            )
        first, last = _whole_groups(start, stop, group, weight.in_features)
        return QuantizedWeight(
            weight.qweight[:, start:stop], weight.scales[:, first:last], weight.zeros[:, first:last],
            weight.bits, group,
        )  # fmt: skip
    if isinstance(weight, AffineGroupWeight):
        first, last = _whole_groups(start, stop, weight.group_size, weight.in_features)
        return AffineGroupWeight(
            weight.qweight[:, start:stop], weight.scales[:, first:last], weight.offsets[:, first:last],
            weight.bits, weight.group_size,
        )  # fmt: skip
    raise ConfigError(f"{weight.kind} weights cannot be split by input columns for tensor parallelism")


def _whole_groups(start: int, stop: int, group: int, width: int) -> tuple[int, int]:
    if start % group or (stop % group and stop != width):
        raise ConfigError(
            f"tensor parallelism would cut a quantization group of {group} columns (at column "
            f"{start if start % group else stop} of {width}); choose a size that splits on whole groups"
        )
    return start // group, -(-stop // group)


# ---------------------------------------------------------------- what the model files call


def qkv_linear(hidden_size: int, heads: HeadSplit, head_dim: int, bias: bool) -> Linear:
    """Fused q/k/v projection of this rank's heads (a plain ``Linear`` in one process)."""
    q_size, kv_size = heads.num_heads * head_dim, heads.num_kv_heads * head_dim
    if distributed.tp_size() == 1:
        return Linear(hidden_size, [q_size, kv_size, kv_size], bias=bias)
    q_start, kv_start = heads.q_start * head_dim, heads.kv_start * head_dim
    q, kv = (q_start, q_start + q_size), (kv_start, kv_start + kv_size)
    return ColumnParallelLinear(hidden_size, [q, kv, kv], bias=bias)


def column_linear(in_features: int, out_features: list[int], bias: bool = False) -> Linear:
    """Each fused output split evenly over the ranks (gate/up)."""
    tp, rank = distributed.tp_size(), distributed.tp_rank()
    if tp == 1:
        return Linear(in_features, out_features, bias=bias)
    for size in out_features:
        if size % tp:
            raise ConfigError(f"tensor parallel size {tp} does not divide the output width {size}")
    return ColumnParallelLinear(in_features, [_even(n, rank, tp) for n in out_features], bias)


def row_linear(in_features: int, out_features: int, bias: bool = False) -> Linear:
    """o / down projection: split inputs, all-reduced outputs (a plain ``Linear`` in one process)."""
    tp = distributed.tp_size()
    if tp == 1:
        return Linear(in_features, out_features, bias=bias)
    if bias:
        raise ConfigError("a row-parallel projection with a bias is not supported under tensor parallelism")
    if in_features % tp:
        raise ConfigError(f"tensor parallel size {tp} does not divide the input width {in_features}")
    return RowParallelLinear(in_features, out_features)


def vocab_embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    if distributed.tp_size() == 1:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size)


def vocab_head(hidden_size: int, vocab_size: int) -> Linear:
    """The output projection, split like ``vocab_embedding`` (so a tied head shares its shard)."""
    if distributed.tp_size() == 1:
        return Linear(hidden_size, vocab_size)
    ranges = vocab_ranges(vocab_size)
    return ColumnParallelLinear(hidden_size, [ranges[distributed.tp_rank()]], vocab_ranges=ranges)
