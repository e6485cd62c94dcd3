"""A token embedding whose table stays block-quantized: a lookup dequantizes only the rows it reads.

Paper: none; this is what llama.cpp's ``get_rows`` does with a quantized ``token_embd``. Idea: a
step reads one row of the table per token, so the table never needs to exist in floating point;
keeping a GGUF file's own blocks (memory-mapped, so only the rows of tokens actually seen become
resident) saves 2-4x its size next to a bf16 copy (SmolLM2-135M Q4_1: 28.7 MiB of Q8_0 blocks
instead of 54 MiB of bf16).

Switch on: automatic when a GGUF file with a block-quantized ``token_embd`` is loaded for
inference (``loading/gguf.py``); the loader supplies the row decoder, so this layer knows no format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class QuantizedEmbedding(nn.Module):
    """``table`` [num_embeddings, bytes per row] (uint8) and ``decode_rows``: raw rows -> float rows."""

    def __init__(
        self,
        table: torch.Tensor,
        embedding_dim: int,
        decode_rows: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
        kind: str = "blocks",
    ) -> None:
        super().__init__()
        if table.dtype != torch.uint8 or table.dim() != 2:
            raise ValueError(
                f"the table must be uint8 [rows, bytes per row], got {table.dtype} {tuple(table.shape)}"
            )
        self.num_embeddings, self.embedding_dim = table.shape[0], embedding_dim
        self.register_buffer("table", table, persistent=False)
        self.decode_rows = decode_rows
        self.dtype = dtype
        self.kind = kind  # the block type's name, for people (``extra_repr``) and memory accounting
        # ids -> float rows from another holder of the same blocks (a tied output layer's kernel
        # data), used instead of decoding ``table`` rows when set.
        self.lookup: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        if self.lookup is not None:
            return self.lookup(flat).to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)
        rows = self.decode_rows(self.table.index_select(0, flat))
        return rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind}"
