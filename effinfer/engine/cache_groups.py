"""Cache groups: layers with the same cache spec share block tables, all groups share one block pool.

The hybrid KV-cache manager of vLLM (2024-25), applied to models that mix full-attention and
sliding-window layers (Mistral, Qwen2's ``max_window_layers``, Gemma 3). If the spec classes have
c1, c2, ... layers, g = gcd(c1, c2, ...) and each class is cut into consecutive chunks of g layers:
each chunk is a cache group with its own block table per sequence. The cache holds g K tensors
(and g V tensors) of [num_blocks, block_size, kv_heads, head_dim]; the j-th layer of every group
uses tensor j, so a block costs g layers' memory whichever group holds it, and a sliding group can
give a block back to the pool that a full group then uses. A model whose layers all have one
spec has one group of all its layers: the classic paged cache. Built from ``model.cache_specs()``
only; nothing to switch on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from effinfer.layers.cache_spec import AttentionCacheSpec


@dataclass(frozen=True)
class CacheGroup:
    spec: AttentionCacheSpec
    layers: tuple[int, ...]  # decoder layer indices; layers[j] keeps its K/V in cache tensor j


@dataclass(frozen=True)
class KVCacheLayout:
    groups: tuple[CacheGroup, ...]

    @classmethod
    def from_specs(cls, specs: list[AttentionCacheSpec]) -> KVCacheLayout:
        if not specs:
            raise ValueError("a model needs at least one cache spec (one per decoder layer)")
        layers_by_spec: dict[AttentionCacheSpec, list[int]] = {}
        for layer, spec in enumerate(specs):
            layers_by_spec.setdefault(spec, []).append(layer)
        size = math.gcd(*(len(layers) for layers in layers_by_spec.values()))
        groups = [
            CacheGroup(spec, tuple(layers[start : start + size]))
            for spec, layers in layers_by_spec.items()
            for start in range(0, len(layers), size)
        ]
        return cls(tuple(groups))

    @property
    def layers_per_block(self) -> int:
        """Cache tensors per K and per V: the layers whose KV one block holds."""
        return len(self.groups[0].layers)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def group_specs(self) -> list[AttentionCacheSpec]:
        return [group.spec for group in self.groups]

    def placement(self) -> dict[int, tuple[int, int]]:
        """Decoder layer index -> (its cache group, the cache tensor it uses)."""
        return {
            layer: (g, tensor)
            for g, group in enumerate(self.groups)
            for tensor, layer in enumerate(group.layers)
        }
