"""What a loaded model keeps in memory: resident tensor bytes per kind, each storage counted once.

A layer's memory is more than its parameters: a quantized ``Linear`` may hold the loaded form
(``quantized``) next to the kernel's packed copy, a dense one a repacked weight, an embedding a
table on a file's memory map. This walks every module's parameters, buffers and, for Linear
layers, everything ``Linear.held_tensors`` names, counts each storage once (tied weights, views)
and sorts the bytes by kind: ``Linear.kernel.codes``, ``lm_head.kernel.scales``,
``QuantizedEmbedding.table``, ``RMSNorm.weight``, ... Storages that lie on a memory-mapped file
are counted apart as ``mapped``: the page cache holds them and only pages that were read (an
embedding's looked-up rows) are resident in the process.

Use: ``memory_accounting(model).render()``, or ``effinfer bench gguf`` (which prints it).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from effinfer.layers.linear import Linear


@dataclass
class MemoryAccounting:
    owned: dict[str, int] = field(default_factory=dict)  # kind -> bytes allocated by the process
    mapped: dict[str, int] = field(default_factory=dict)  # kind -> bytes that lie on a file's map
    tensors: dict[str, int] = field(default_factory=dict)  # kind -> number of storages

    @property
    def owned_bytes(self) -> int:
        return sum(self.owned.values())

    @property
    def mapped_bytes(self) -> int:
        return sum(self.mapped.values())

    def render(self, reference_bytes: int | None = None, reference: str = "file") -> str:
        """A Markdown table, largest kind first; ``reference_bytes`` adds a ratio column (e.g. the GGUF file)."""
        mib = 1 << 20
        ratio = reference_bytes is not None and reference_bytes > 0
        lines = [
            "| kind | storages | owned MiB | mapped MiB |" + (f" × {reference} |" if ratio else ""),
            "|---|---:|---:|---:|" + ("---:|" if ratio else ""),
        ]
        kinds = sorted(
            set(self.owned) | set(self.mapped), key=lambda k: -(self.owned.get(k, 0) + self.mapped.get(k, 0))
        )
        rows = [(k, self.tensors.get(k, 0), self.owned.get(k, 0), self.mapped.get(k, 0)) for k in kinds]
        rows.append(("total", sum(self.tensors.values()), self.owned_bytes, self.mapped_bytes))
        for kind, count, owned, mapped in rows:
            cells = f"| {kind} | {count} | {owned / mib:.2f} | {mapped / mib:.2f} |"
            if ratio:
                cells += f" {(owned + mapped) / reference_bytes:.3f} |"
            lines.append(cells)
        return "\n".join(lines)


def held_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(kind, tensor) for every tensor the model's modules keep alive (duplicates included)."""
    held = []
    for name, module in model.named_modules():
        owner = "lm_head" if name.rpartition(".")[2] == "lm_head" else type(module).__name__
        if isinstance(module, Linear):
            pairs = module.held_tensors()
        else:
            pairs = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        held += [(f"{owner}.{path}", tensor) for path, tensor in pairs if tensor is not None]
    return held


def memory_accounting(model: nn.Module) -> MemoryAccounting:
    """Resident bytes of the model's tensors by kind; each storage once, under the first kind that holds it."""
    acc = MemoryAccounting()
    starts, ends = _file_mappings()
    seen: set[int] = set()
    counts: dict[str, int] = defaultdict(int)
    for kind, tensor in held_tensors(model):
        if tensor.device.type == "meta":
            continue  # a description only (a released quantized weight)
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        address = storage.data_ptr()
        i = bisect.bisect_right(starts, address) - 1
        on_file = tensor.device.type == "cpu" and i >= 0 and address < ends[i]
        where = acc.mapped if on_file else acc.owned
        where[kind] = where.get(kind, 0) + storage.nbytes()
        counts[kind] += 1
    acc.tensors = dict(counts)
    return acc


def _file_mappings() -> tuple[list[int], list[int]]:
    """Sorted (starts, ends) of this process's file-backed memory mappings (none off Linux)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return [], []
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        # A mapping with a path (not [heap] / [stack]) and a non-zero inode is backed by a file.
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    ranges.sort()
    return [s for s, _ in ranges], [e for _, e in ranges]


def rss_bytes(pid: int | str = "self", field_name: str = "VmRSS") -> int:
    """A process's resident set (``VmRSS``) or its peak (``VmHWM``) from /proc, in bytes; 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_freed_memory() -> None:
    """Hand memory that loading freed back to the OS (glibc keeps freed heap pages otherwise).

    Loading frees many medium-sized intermediates (unpacked codes, float32 scales); glibc's
    allocator keeps them for reuse, which for SmolLM2-135M Q4_1 left ~150 MiB resident that no
    tensor used. ``malloc_trim`` returns them; elsewhere (no glibc) this does nothing.
    """
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
