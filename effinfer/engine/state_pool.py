"""The recurrent-state pool: one fixed-size slot per running sequence of a model with recurrent layers.

A Mamba layer's cache is a conv window and an SSM state whose size does not depend on the
sequence's length (``layers/cache_spec.py``'s ``RecurrentStateSpec``), so instead of blocks a
sequence takes one slot at admission, holding that state for every recurrent layer, and gives it
back when it finishes, is aborted or is preempted (a preempted sequence recomputes its state from
its tokens, as it recomputes KV). The runner zeroes a slot when its sequence's first token runs.
"""

from __future__ import annotations


class StatePool:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() takes the lowest slot first

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free recurrent-state slot")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, "state slot freed twice"
        self._free.append(slot)
