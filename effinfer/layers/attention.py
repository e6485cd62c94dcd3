"""Attention over the paged KV cache.

Every token's key and value are first written into its slot of the cache (``slot_mapping``);
queries then attend to their sequence's whole context, read back through its block table.
Layers with the same cache spec form a cache group with its own slot mapping and block tables
(``AttentionMetadata.for_group``); in a sliding-window group, blocks that left the window are
given back and their table entries point at a placeholder block, which the window mask hides.
A step gives each sequence any number of query tokens (variable length): a prompt or a chunk of
one, a single decode token, or a token plus speculative ones to verify. Sequences with several
queries run one at a time (each has its own length and cached prefix, causal within its queries);
the single-query ones run together as a decode batch, padding contexts to the longest and masking
the padding (on CPU the fused C++ decode attention reads the blocks in place). On CUDA, Triton
kernels store the keys and values, run decode attention split over the context and prefill
attention over all sequences at once, reading the blocks in place (``kernels/triton/gpu_ops.py``).

int8 KV cache (``EngineConfig(kv_cache_dtype="int8")``; KV-cache quantization as in KIVI, Liu et
al. 2024, KVQuant, Hooper et al. 2024, and vLLM's int8/fp8 KV cache): each token's key and value
are stored as int8 with one float32 scale per (token slot, KV head), absmax / 127, computed when
the token is written; attention dequantizes what it reads back. The cache then takes about half
the bytes of bf16, so the same memory holds about twice the tokens. A prompt's own first
prefill attends to its exact fresh keys (as vLLM does); cached prefixes and decode read int8.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effinfer.kernels.cpu import flash_prefill, fused
from effinfer.kernels.triton import gpu_ops
from effinfer.layers.attention_sinks import attend_with_sinks

FUSED_MAX_HEAD_DIM = 256  # the fused decode attention keeps one query row in 16 registers


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [T, kv_heads, d] and float32 scales [T, kv_heads] of keys or values [T, kv_heads, d].

    Symmetric absmax per (token, head): every element is off by at most scale / 2 = absmax / 254.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=1e-8) / 127
    return torch.clamp(torch.round(xf / scale[..., None]), -127, 127).to(torch.int8), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The keys or values [..., d] that int8 ``codes`` and their per-(token, head) ``scale`` [...] stand for."""
    return (codes.float() * scale[..., None]).to(dtype)


@dataclass
class AttentionMetadata:
    # False only when every sequence has exactly one query token (a pure decode batch).
    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V goes to
    block_tables: torch.Tensor  # [num_seqs, max_blocks] padded with 0 (masked out)
    context_lens: list[int]  # tokens of context per sequence after this step
    query_lens: list[int]  # new tokens per sequence in this step
    block_size: int
    context_lens_tensor: torch.Tensor | None = None  # [num_seqs]; needed where a sequence has one query
    # Per cache group (layers with one cache spec share block tables); None: one group, the above.
    group_slot_mappings: list[torch.Tensor] | None = None
    group_block_tables: list[torch.Tensor] | None = None
    _decode_masks: dict = field(default_factory=dict)
    _decode_part: tuple | None = None
    _group_views: dict = field(default_factory=dict)

    def for_group(self, group: int) -> AttentionMetadata:
        """This step's metadata as seen by the layers of cache group ``group`` (its slots and tables)."""
        if group == 0 or self.group_slot_mappings is None:
            return self
        if group not in self._group_views:
            self._group_views[group] = dataclasses.replace(
                self,
                slot_mapping=self.group_slot_mappings[group],
                block_tables=self.group_block_tables[group],
                group_slot_mappings=None,
                group_block_tables=None,
                _decode_masks={},
                _decode_part=None,
                _group_views={},
            )
        return self._group_views[group]

    @functools.cached_property
    def varlen_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query start offsets [B + 1], context lengths [B]) on the tables' device, for varlen kernels."""
        starts = torch.tensor(self.query_start_locs, device=self.block_tables.device)
        return starts, torch.tensor(self.context_lens, device=starts.device)

    @functools.cached_property
    def query_start_locs(self) -> list[int]:
        """Where each sequence's queries start in the flat batch, and the total at the end."""
        starts = [0]
        for q_len in self.query_lens:
            starts.append(starts[-1] + q_len)
        return starts

    def decode_part(self) -> tuple[torch.Tensor, AttentionMetadata] | None:
        """(query rows, metadata) of the sequences with one query token in a mixed step; None if none."""
        if self._decode_part is None:
            indices = [i for i, q_len in enumerate(self.query_lens) if q_len == 1]
            if not indices:
                self._decode_part = (None,)
            else:
                device = self.block_tables.device
                rows = torch.tensor([self.query_start_locs[i] for i in indices], device=device)
                index = torch.tensor(indices, device=device)
                lens = [self.context_lens[i] for i in indices]
                meta = AttentionMetadata(
                    is_prefill=False,
                    slot_mapping=self.slot_mapping.index_select(0, rows),
                    block_tables=self.block_tables.index_select(0, index),
                    context_lens=lens,
                    query_lens=[1] * len(indices),
                    block_size=self.block_size,
                    context_lens_tensor=torch.tensor(lens, device=device),
                )
                self._decode_part = (rows, meta)
        return None if self._decode_part[0] is None else self._decode_part

    def decode_hidden_keys(self, window: int | None) -> torch.Tensor | None:
        """Boolean [B, 1, 1, L], True for keys a one-token query must not see; None when it sees all."""
        if window not in self._decode_masks:
            num_keys = self.block_tables.shape[1] * self.block_size
            key_pos = torch.arange(num_keys, device=self.block_tables.device)
            lens = self.context_lens_tensor[:, None]
            visible = key_pos[None, :] < lens
            if window is not None:
                visible &= key_pos[None, :] >= lens - window
            everything = window is None and len(self.context_lens) == 1 and self.context_lens[0] == num_keys
            self._decode_masks[window] = None if everything else ~visible[:, None, None, :]
        return self._decode_masks[window]


@dataclass
class DenseCausal:
    """Metadata for training and scoring: a [batch, seq_len] block of whole sequences, no KV cache."""

    batch: int
    seq_len: int


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
        *,
        scale: float | None = None,
        sink_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Softmax temperature of q·k; head_dim ** -0.5 unless the model says otherwise (Gemma's
        # query_pre_attn_scalar).
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        # Attention sinks (layers/attention_sinks.py): these first positions stay visible beside the window.
        self.sink_tokens = sink_tokens
        # Bound by the runner once the cache is allocated: [num_blocks, block_size, kv_heads, head_dim].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # int8 cache only: float32 [num_blocks, block_size, kv_heads], one scale per slot and head.
        self.k_scale_cache: torch.Tensor | None = None
        self.v_scale_cache: torch.Tensor | None = None
        self.cache_group = 0  # whose slot mapping and block tables this layer reads

    def bind_cache(
        self,
        group: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k_scale_cache: torch.Tensor | None = None,
        v_scale_cache: torch.Tensor | None = None,
    ) -> None:
        """Attach the cache tensors this layer shares with the same-position layers of other groups."""
        self.cache_group = group
        self.k_cache, self.v_cache = k_cache, v_cache
        self.k_scale_cache, self.v_scale_cache = k_scale_cache, v_scale_cache

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata | DenseCausal,
        q_at_cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d]. Returns [T, heads * d].

        ``q_at_cache``: with attention sinks, the queries rotated at their cache positions.
        """
        if self.sink_tokens and q_at_cache is None:
            raise ValueError(
                "a layer with attention sinks needs the queries rotated at their cache positions"
            )
        if isinstance(meta, DenseCausal):
            return self._dense(q, k, v, meta, q_at_cache)
        meta = meta.for_group(self.cache_group)
        if self.runs_triton(q):
            return self._triton(q, k, v, meta).reshape(q.shape[0], self.num_heads * self.head_dim)
        self._store(k, v, meta.slot_mapping)
        if meta.is_prefill:
            out = self._prefill(q, k, v, meta, q_at_cache)
        else:
            out = self._decode(q, meta, q_at_cache)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def decode_block(
        self, qkv: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], meta
    ) -> torch.Tensor | None:
        """A decode step's attention straight from the fused projection ``qkv`` [T, (heads + 2 kv) d]:
        rotary, KV store and attention in one CPU call ([T, heads * d]); None where the step needs
        the general path (prefill, sinks, an int8 cache, other devices or dtypes)."""
        cos, sin = cos_sin
        if (
            isinstance(meta, DenseCausal)
            or meta.is_prefill
            or meta.context_lens_tensor is None
            or self.sink_tokens
            or cos.dtype != qkv.dtype
            or cos.shape[-1] != self.head_dim
            or not qkv.is_contiguous()
            or not self._fused_decode(qkv)
        ):
            return None
        meta = meta.for_group(self.cache_group)
        return fused.extension().decode_attention_block(
            qkv, self.num_heads, self.num_kv_heads, cos.squeeze(1), sin.squeeze(1), self.k_cache,
            self.v_cache, meta.slot_mapping, meta.block_tables, meta.context_lens_tensor, self.scale,
            self._window,
        )  # fmt: skip

    def _fused_decode(self, x: torch.Tensor) -> bool:
        """Whether the fused CPU decode attention takes this layer with activations like ``x``."""
        return (
            self.k_scale_cache is None
            and self.k_cache.dtype == x.dtype
            and self.head_dim % 2 == 0
            and self.head_dim <= FUSED_MAX_HEAD_DIM
            and fused.usable(x)
        )

    @property
    def _window(self) -> int:
        """The sliding window as the fused kernels take it (-1: none)."""
        return -1 if self.sliding_window is None else self.sliding_window

    def runs_triton(self, q: torch.Tensor) -> bool:
        """Whether queries like ``q`` go to the Triton kernels: CUDA, a cache of q's dtype, no sinks."""
        return (
            not self.sink_tokens
            and self.k_scale_cache is None
            and self.k_cache.dtype == q.dtype
            and gpu_ops.usable(q)
        )

    def _triton(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        ops = gpu_ops.kernels()
        ops.paged_kv_store.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if not meta.is_prefill:
            lens = meta.context_lens_tensor
            if lens is None:
                lens = torch.tensor(meta.context_lens, device=q.device)
            return ops.paged_decode_attention.decode_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, lens, self.scale, self.sliding_window
            )
        if q.dtype not in ops.varlen_prefill_attention.DTYPES:  # float32: PyTorch over the same cache
            return self._prefill(q, k, v, meta)
        query_starts, context_lens = meta.varlen_tensors
        return ops.varlen_prefill_attention.prefill_attention(
            q, self.k_cache, self.v_cache, meta.block_tables, query_starts, context_lens,
            max(meta.query_lens), self.scale, self.sliding_window,
        )  # fmt: skip

    def _store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        k_slots = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_slots = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_scale_cache is None:
            if k.dtype == self.k_cache.dtype and fused.usable(k):  # one call, not two dispatches
                fused.extension().store_kv(k, v, self.k_cache, self.v_cache, slot_mapping)
                return
            k_slots.index_copy_(0, slot_mapping, k)
            v_slots.index_copy_(0, slot_mapping, v)
            return
        for x, slots, scales in ((k, k_slots, self.k_scale_cache), (v, v_slots, self.v_scale_cache)):
            codes, scale = quantize_kv(x)
            slots.index_copy_(0, slot_mapping, codes)
            scales.view(-1, self.num_kv_heads).index_copy_(0, slot_mapping, scale)

    def _dense(self, q, k, v, meta: DenseCausal, q_at_cache=None) -> torch.Tensor:
        def heads_first(x):
            return x.view(meta.batch, meta.seq_len, -1, self.head_dim).transpose(1, 2)

        if self.sink_tokens:
            positions = torch.arange(meta.seq_len, device=q.device).expand(meta.batch, -1)
            keys, values = heads_first(k), heads_first(v)
            sinks = (keys[:, :, : self.sink_tokens], values[:, :, : self.sink_tokens])
            out = attend_with_sinks(
                heads_first(q), heads_first(q_at_cache), positions, (keys, values), positions, sinks,
                self.sliding_window, self.scale,
            )  # fmt: skip
            return out.transpose(1, 2).reshape(q.shape[0], self.num_heads * self.head_dim)

        if meta.batch == 1 and (out := self._flash(q, k, v)) is not None:
            return out
        mask = self._prefill_mask(meta.seq_len, meta.seq_len, q.device)
        out = self._attend(heads_first(q), heads_first(k), heads_first(v), mask)
        return out.transpose(1, 2).reshape(q.shape[0], self.num_heads * self.head_dim)

    def _flash(self, q, k, v) -> torch.Tensor | None:
        """One sequence's causal attention on the CPU flash kernel: [T_q, heads * d] from q [T_q, heads, d]
        (the last T_q positions) and k, v [T_k, kv_heads, d]; None where the kernel does not apply."""
        if not flash_prefill.usable(q, self.head_dim) or k.dtype != q.dtype:
            return None
        # Views: the heads of a row are contiguous.
        q, k, v = q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1)
        return flash_prefill.causal_attention(
            q, k, v, self.num_heads, self.num_kv_heads, self.scale, self.sliding_window
        )

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA over [B, heads, T, d] queries and [B, kv_heads, L, d] keys / values.

        The KV heads are repeated up to the query heads first: with ``enable_gqa`` PyTorch's CPU
        SDPA falls back to its unfused math path (5x slower on a 64-token prompt than the flash
        kernel these 4-D, equal-head inputs get).
        """
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale
        )

    def _prefill(self, q, k, v, meta: AttentionMetadata, q_at_cache=None) -> torch.Tensor:
        """Any number of queries per sequence; the one-query sequences of a mixed step run as one
        decode batch, the others one sequence at a time."""
        decode = meta.decode_part() if len(meta.query_lens) > 1 else None
        if decode is None:
            outputs = [self._one_sequence(q, k, v, meta, i, q_at_cache) for i in range(len(meta.query_lens))]
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        rows, decode_meta = decode
        out = q.new_empty(q.shape)
        decode_q_at_cache = None if q_at_cache is None else q_at_cache.index_select(0, rows)
        decoded = self._decode(q.index_select(0, rows), decode_meta, decode_q_at_cache)
        out[rows] = decoded.reshape(len(rows), *q.shape[1:])
        starts = meta.query_start_locs
        for i, q_len in enumerate(meta.query_lens):
            if q_len > 1:
                out[starts[i] : starts[i + 1]] = self._one_sequence(q, k, v, meta, i, q_at_cache)
        return out

    def _one_sequence(self, q, k, v, meta: AttentionMetadata, i: int, q_at_cache=None) -> torch.Tensor:
        """Sequence i's queries [q_len, heads, d] against its context, causal among themselves."""
        if self.sink_tokens:
            return self._one_sequence_with_sinks(q, k, v, q_at_cache, meta, i)
        start = meta.query_start_locs[i]
        q_len, ctx_len = meta.query_lens[i], meta.context_lens[i]
        if ctx_len == q_len:  # nothing cached: the fresh keys are the whole context
            k_i, v_i = k[start : start + q_len], v[start : start + q_len]
        else:
            k_i, v_i = self._gather(meta.block_tables[i : i + 1], ctx_len, q.dtype)
            k_i, v_i = k_i[0], v_i[0]
        flash = self._flash(q[start : start + q_len], k_i, v_i)
        if flash is not None:
            return flash.view(q_len, self.num_heads, self.head_dim)
        q_i = q[start : start + q_len].transpose(0, 1)[None]
        k_i, v_i = k_i.transpose(0, 1)[None], v_i.transpose(0, 1)[None]
        out = self._attend(q_i, k_i, v_i, self._prefill_mask(q_len, ctx_len, q.device))
        return out[0].transpose(0, 1)

    def _prefill_mask(self, q_len: int, ctx_len: int, device) -> torch.Tensor | None:
        if q_len == ctx_len and self.sliding_window is None:
            return None  # plain causal
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
        k_pos = torch.arange(ctx_len, device=device)[None, :]
        visible = k_pos <= q_pos
        if self.sliding_window is not None:
            visible &= k_pos > q_pos - self.sliding_window
        return visible

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata, q_at_cache=None) -> torch.Tensor:
        if self.sink_tokens:  # the fused kernel knows no sinks
            return self._decode_with_sinks(q, q_at_cache, meta)
        if self._fused_decode(q):
            # Reads keys and values in place from their blocks: no gathered copy of every context.
            return fused.extension().decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.context_lens_tensor,
                self.scale,
                self._window,
            )
        return self._decode_reference(q, meta)

    def _decode_reference(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # One query per sequence: two small batched matmuls beat SDPA's flash kernel, which is
        # built for long query blocks (2x faster at batch 16 on CPU). Query heads are grouped
        # under their KV head, so GQA needs no copy of the keys.
        k, v = self._gather(meta.block_tables, None, q.dtype)  # [B, L, kv_heads, d]
        batch, group = q.shape[0], self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(q, k.permute(0, 2, 3, 1)).float() * self.scale  # [B, kv_heads, group, L]
        hidden = meta.decode_hidden_keys(self.sliding_window)
        if hidden is not None:
            scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v.transpose(1, 2))  # [B, kv_heads, group, d]

    def _gather(self, block_tables: torch.Tensor, length: int | None, dtype: torch.dtype):
        """Keys and values [num_seqs, L, kv_heads, d] of the blocks in ``block_tables``, in ``dtype``."""
        num_seqs, max_blocks = block_tables.shape
        flat = block_tables.reshape(-1)
        shape = (num_seqs, max_blocks * self.k_cache.shape[1], self.num_kv_heads, self.head_dim)
        k = self.k_cache.index_select(0, flat).view(shape)
        v = self.v_cache.index_select(0, flat).view(shape)
        if length is not None:
            k, v = k[:, :length], v[:, :length]
        if self.k_scale_cache is None:
            return k, v
        k_scale = self.k_scale_cache.index_select(0, flat).view(shape[:3])
        v_scale = self.v_scale_cache.index_select(0, flat).view(shape[:3])
        if length is not None:
            k_scale, v_scale = k_scale[:, :length], v_scale[:, :length]
        return dequantize_kv(k, k_scale, dtype), dequantize_kv(v, v_scale, dtype)

    def _one_sequence_with_sinks(self, q, k, v, q_at_cache, meta: AttentionMetadata, i: int) -> torch.Tensor:
        """``_one_sequence`` reading only the sinks and the blocks the chunk's windows touch."""
        start, q_len, ctx_len = meta.query_start_locs[i], meta.query_lens[i], meta.context_lens[i]
        first_query = ctx_len - q_len
        if ctx_len == q_len:  # nothing cached: the fresh keys are the whole context
            key_start, keys, values = 0, k[start : start + q_len][None], v[start : start + q_len][None]
        else:
            first_block = max(0, first_query - self.sliding_window + 1) // meta.block_size
            key_start = first_block * meta.block_size
            keys, values = self._gather(
                meta.block_tables[i : i + 1, first_block:], ctx_len - key_start, q.dtype
            )
        num_sinks = min(self.sink_tokens, ctx_len)
        if key_start == 0:
            sinks = keys[:, :num_sinks], values[:, :num_sinks]
        else:
            sinks = self._gather(
                meta.block_tables[i : i + 1, : -(-num_sinks // meta.block_size)], num_sinks, q.dtype
            )
        device = q.device
        out = attend_with_sinks(
            q[start : start + q_len].transpose(0, 1)[None],
            q_at_cache[start : start + q_len].transpose(0, 1)[None],
            torch.arange(first_query, ctx_len, device=device)[None],
            (keys.transpose(1, 2), values.transpose(1, 2)),
            torch.arange(key_start, ctx_len, device=device)[None],
            (sinks[0].transpose(1, 2), sinks[1].transpose(1, 2)),
            self.sliding_window,
            self.scale,
        )
        return out[0].transpose(0, 1)

    def _decode_with_sinks(self, q, q_at_cache, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence over its sinks and the blocks its window touches, [B, heads, d]."""
        block_size, tables = meta.block_size, meta.block_tables
        device, lens = q.device, meta.context_lens_tensor
        # Blocks that cover any window of W positions; columns past a table's end read padding
        # whose positions lie past the query, hence masked.
        span = min(-(-self.sliding_window // block_size) + 1, tables.shape[1])
        first_block = (lens - self.sliding_window).clamp(min=0) // block_size
        columns = (first_block[:, None] + torch.arange(span, device=device)).clamp(max=tables.shape[1] - 1)
        keys, values = self._gather(tables.gather(1, columns), None, q.dtype)
        key_positions = first_block[:, None] * block_size + torch.arange(keys.shape[1], device=device)
        num_sinks = min(self.sink_tokens, tables.shape[1] * block_size)
        sink_k, sink_v = self._gather(tables[:, : -(-num_sinks // block_size)], num_sinks, q.dtype)
        out = attend_with_sinks(
            q[:, :, None],
            q_at_cache[:, :, None],
            (lens - 1)[:, None],
            (keys.transpose(1, 2), values.transpose(1, 2)),
            key_positions,
            (sink_k.transpose(1, 2), sink_v.transpose(1, 2)),
            self.sliding_window,
            self.scale,
        )
        return out[:, :, 0]
