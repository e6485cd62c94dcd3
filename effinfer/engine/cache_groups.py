"""Cache groups: layers with the same cache spec share block tables, all groups share one block pool.

The hybrid KV-cache manager of vLLM (2024-25), applied to models that mix full-attention and
sliding-window layers (Mistral, Qwen2's ``max_window_layers``, Gemma 3). If the spec classes have
c1, c2, ... layers, g = gcd(c1, c2, ...) and each class is cut into consecutive chunks of g layers:
each chunk is a cache group with its own block table per sequence. The cache holds g K tensors
(and g V tensors) of [num_blocks, block_size, kv_heads, head_dim]; the j-th layer of every group
uses tensor j, so a block costs g layers' memory whichever group holds it, and a sliding group can
give a block back to the pool that a full group then uses. A model whose layers all have one
spec has one group of all its layers: the classic paged cache. Recurrent layers (Mamba) take no
blocks: the layout lists their state specs, and each running sequence owns one slot of a state pool
holding every recurrent layer's state (``engine/state_pool.py``). A hybrid model mixes both. Built
from ``model.cache_specs()`` only; nothing to switch on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from effinfer.layers.cache_spec import AttentionCacheSpec, CacheSpec, RecurrentStateSpec


@dataclass(frozen=True)
class CacheGroup:
    spec: AttentionCacheSpec
    # attention layers by their order among the attention layers (the decoder layer index when every
    # layer attends); layers[j] keeps its K/V in cache tensor j
    layers: tuple[int, ...]


@dataclass(frozen=True)
class KVCacheLayout:
    groups: tuple[CacheGroup, ...]
    state_specs: tuple[RecurrentStateSpec, ...] = ()  # one per recurrent layer, in layer order

    @classmethod
    def from_specs(cls, specs: list[CacheSpec]) -> KVCacheLayout:
        if not specs:
            raise ValueError("a model needs at least one cache spec (one per decoder layer)")
        attention = [spec for spec in specs if isinstance(spec, AttentionCacheSpec)]
        layers_by_spec: dict[AttentionCacheSpec, list[int]] = {}
        for layer, spec in enumerate(attention):
            layers_by_spec.setdefault(spec, []).append(layer)
        size = math.gcd(*(len(layers) for layers in layers_by_spec.values())) if attention else 0
        groups = [
            CacheGroup(spec, tuple(layers[start : start + size]))
            for spec, layers in layers_by_spec.items()
            for start in range(0, len(layers), size)
        ]
        states = tuple(spec for spec in specs if isinstance(spec, RecurrentStateSpec))
        return cls(tuple(groups), states)

    @property
    def layers_per_block(self) -> int:
        """Cache tensors per K and per V: the layers whose KV one block holds (0 without attention)."""
        return len(self.groups[0].layers) if self.groups else 0

    @property
    def has_recurrent_state(self) -> bool:
        return bool(self.state_specs)

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
