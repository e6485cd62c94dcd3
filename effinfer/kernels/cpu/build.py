"""Builds the C++ CPU kernels on first use (torch.utils.cpp_extension, cached by content hash).

A kernel that cannot be built or run here (no compiler, a CPU without the instructions it needs,
or switched off by its environment variable) is None, and its callers run the PyTorch reference.
``EFFINFER_REQUIRE_KERNELS=1`` (set by CI) makes a kernel that fails to build or load on a CPU
that has its instructions raise ``KernelBuildError`` instead: there the fallback would hide a bug
and turn the kernel's tests into skips. A CPU without the instructions still gets None.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REQUIRE_SWITCH = "EFFINFER_REQUIRE_KERNELS"
# Kernel sources, copied by digest (see _content_addressed_copy).
SOURCE_CACHE = Path(
    os.environ.get("EFFINFER_KERNEL_SOURCES", Path.home() / ".cache" / "effinfer" / "kernel-sources")
)


class KernelBuildError(RuntimeError):
    """A kernel failed to build or load on a CPU that has its instructions, with EFFINFER_REQUIRE_KERNELS=1."""


# Builds that failed under the switch, by (name, source, flags): the error is raised again at
# once instead of compiling again on every call (the callers cache only successes).
_failures: dict[tuple, KernelBuildError] = {}

# What every kernel here is compiled with and needs: AVX-512 with bf16 dot products, OpenMP.
AVX512_BF16_FLAGS = [
    "-O3",
    "-fopenmp",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512bf16",
    "-mfma",
]
AVX512_BF16_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
# And the kernels that multiply on AMX tiles (their module exports ``amx_ready``).
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16"]
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def load(
    name: str,
    source: Path,
    compile_flags: list[str],
    required_cpu_flags: tuple[str, ...],
    fallback: str,
    switch: str,
    needs_amx: bool = False,
) -> Any | None:
    """The compiled module ``name`` built from ``source``, or None with one message saying ``fallback``.

    None also when the environment variable ``switch`` is "0", and, with ``needs_amx``, when the
    operating system refuses the module AMX tile state. With ``EFFINFER_REQUIRE_KERNELS=1``, a
    build or AMX failure on a CPU with ``required_cpu_flags`` raises ``KernelBuildError``.
    """
    if os.environ.get(switch, "1") == "0":
        return None
    missing = [f for f in required_cpu_flags if f not in cpu_flags()]
    if missing:
        logger.info("CPU lacks %s: %s", ", ".join(missing), fallback)
        return None
    required = os.environ.get(REQUIRE_SWITCH) == "1"
    key = (name, str(source), tuple(compile_flags))
    if required and key in _failures:
        raise _failures[key]
    try:
        module = _build(name, source, compile_flags)
        refused = needs_amx and not module.amx_ready()
        problem = f"{source.name}: the kernel refused AMX tile state" if refused else None
    except Exception as exc:  # no compiler, no ninja, a compile error, a library that will not load
        detail = str(exc).strip().splitlines()
        problem = f"could not build {source.name} ({' / '.join(detail[:1] + detail[-3:])})"
    if problem is None:
        return module
    if required:
        _failures[key] = KernelBuildError(
            f"{problem}, on a CPU that has {', '.join(required_cpu_flags)} ({REQUIRE_SWITCH}=1)"
        )
        raise _failures[key]
    logger.warning("%s: %s", problem, fallback)
    return None


def _build(name: str, source: Path, compile_flags: list[str]) -> Any:
    from torch.utils import cpp_extension

    # The cache key covers the source, the headers beside it and the flags: any change rebuilds.
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    # (The "sources by digest" salt keeps these builds apart from those that compiled in place.)
    # The torch installation is in the key too: its include paths are written into the build file,
    # so two virtual environments sharing ~/.cache/torch_extensions would rebuild each other's module.
    import torch

    installation = f"{torch.__version__} {Path(torch.__file__).parent}".encode()
    digest = hashlib.sha1(
        b"sources by digest" + text + " ".join(compile_flags).encode() + installation
    ).hexdigest()[:10]
    if not _is_built(f"{name}_{digest}"):
        logger.warning("first use: compiling %s (~20 s; cached for later runs)", source.name)
        _remove_stale_lock(f"{name}_{digest}")
    return cpp_extension.load(
        name=f"{name}_{digest}",
        sources=[str(_content_addressed_copy(source, f"{name}_{digest}"))],
        extra_cflags=compile_flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _content_addressed_copy(source: Path, key: str) -> Path:
    """The source and its headers copied to a directory named by their digest.

    torch rebuilds an extension whenever its build file changes, and the build file names the source
    path: two checkouts of the same code (a worktree, a CI clone) would rebuild each other's cached
    module forever. Built from this copy, identical code has one path and is compiled once.
    """
    directory = SOURCE_CACHE / key
    copy = directory / source.name
    if not copy.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        for path in [
            *sorted(source.parent.glob("*.h")),
            source,
        ]:  # the source last: its presence marks a full copy
            staged = directory / f".{path.name}.{os.getpid()}"
            shutil.copyfile(path, staged)
            os.replace(staged, directory / path.name)  # atomic: a concurrent builder never sees half a file
    return copy


# torch waits forever on the lock file a build leaves behind when its process is killed, so a lock
# far older than a build (~20 s, a few minutes on a loaded machine) belongs to nobody.
STALE_LOCK_SECONDS = 900


def _remove_stale_lock(name: str) -> None:
    from torch.utils import cpp_extension

    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            logger.warning("removing a stale build lock left by a killed build: %s", lock)
            lock.unlink()
    except (OSError, AttributeError):  # no lock (the usual case), or torch's private helper moved
        pass


def _is_built(name: str) -> bool:
    from torch.utils import cpp_extension

    try:
        directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # a private helper of torch's: if it moves, just say nothing
        return True
    return (directory / f"{name}.so").exists()
