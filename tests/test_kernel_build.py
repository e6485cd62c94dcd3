"""EFFINFER_REQUIRE_KERNELS (kernels/cpu/build.py): a C++ kernel that fails to build on a CPU able to
run it fails CI instead of turning its tests into skips; a CPU without the instructions still skips."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from effinfer.kernels.cpu import build
from tests.conftest import REPO_ROOT, cpu_kernel_missing

SWITCH = "EFFINFER_TEST_BROKEN_KERNEL"  # the broken kernel's own on/off switch, never set


@pytest.fixture
def broken_source(tmp_path: Path) -> Path:
    """A source the real compiler rejects on its first line, so the failing build takes a second."""
    source = tmp_path / "broken_kernel.cpp"
    source.write_text('#error "deliberately broken kernel source"\n')
    return source


def load_broken(source: Path, required_cpu_flags: tuple[str, ...] = ()):
    # No required flags: every CPU counts as able to run it.
    return build.load(
        "effinfer_broken_test", source, ["-O1"], required_cpu_flags, "runs the reference", SWITCH
    )


def test_with_the_switch_a_failed_build_raises(broken_source, monkeypatch):
    monkeypatch.setenv(build.REQUIRE_SWITCH, "1")
    with pytest.raises(build.KernelBuildError, match="could not build broken_kernel.cpp") as first:
        load_broken(broken_source)
    assert build.REQUIRE_SWITCH in str(first.value)
    # Asked again (the callers cache only successes), the same error comes back without a rebuild.
    with pytest.raises(build.KernelBuildError) as again:
        load_broken(broken_source)
    assert again.value is first.value
    assert not cpu_kernel_missing(lambda: load_broken(broken_source))  # its tests run, and fail


def test_without_the_switch_a_failed_build_warns_and_falls_back(broken_source, monkeypatch, caplog):
    monkeypatch.delenv(build.REQUIRE_SWITCH, raising=False)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert load_broken(broken_source) is None
    assert "could not build broken_kernel.cpp" in caplog.text and "runs the reference" in caplog.text
    assert cpu_kernel_missing(lambda: load_broken(broken_source))


def test_a_cpu_without_the_instructions_skips_even_with_the_switch(broken_source, monkeypatch):
    monkeypatch.setenv(build.REQUIRE_SWITCH, "1")
    assert load_broken(broken_source, required_cpu_flags=("no_such_cpu_flag",)) is None
    assert cpu_kernel_missing(lambda: load_broken(broken_source, ("no_such_cpu_flag",)))


def test_a_kernel_switched_off_stays_off_with_the_switch(broken_source, monkeypatch):
    monkeypatch.setenv(build.REQUIRE_SWITCH, "1")
    monkeypatch.setenv(SWITCH, "0")
    assert load_broken(broken_source) is None


class RefusesAmx:
    def amx_ready(self) -> bool:
        return False


@pytest.mark.parametrize("required", [True, False])
def test_refused_amx_state_raises_only_with_the_switch(tmp_path, monkeypatch, required):
    monkeypatch.setattr(build, "_build", lambda *args: RefusesAmx())
    if required:
        monkeypatch.setenv(build.REQUIRE_SWITCH, "1")
    else:
        monkeypatch.delenv(build.REQUIRE_SWITCH, raising=False)
    source = tmp_path / "amx_kernel.cpp"
    args = ("effinfer_amx_test", source, [], (), "runs the reference", SWITCH)
    if required:
        with pytest.raises(build.KernelBuildError, match="refused AMX tile state"):
            build.load(*args, needs_amx=True)
    else:
        assert build.load(*args, needs_amx=True) is None


# Loaded into a pytest run before it collects: every C++ build fails, on a CPU said to have every flag.
BREAK_BUILDS_PLUGIN = """
from torch.utils import cpp_extension
from effinfer.kernels.cpu import build


def _refuse(*args, **kwargs):
    raise RuntimeError("compiler exploded on purpose")


cpp_extension.load = _refuse
build.cpu_flags = lambda: {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16",
                           "amx_tile", "amx_bf16"}
"""


@pytest.mark.slow
@pytest.mark.parametrize("required", [True, False])
def test_kernel_tests_fail_instead_of_skipping_under_the_switch(tmp_path, required):
    """The real kernel tests (test_fused_ops.py) with the build broken: failures with the switch, skips without."""
    (tmp_path / "break_builds.py").write_text(textwrap.dedent(BREAK_BUILDS_PLUGIN))
    env = {k: v for k, v in os.environ.items() if k not in (build.REQUIRE_SWITCH, "EFFINFER_CPU_FUSED")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO_ROOT), env.get("PYTHONPATH", "")])
    if required:
        env[build.REQUIRE_SWITCH] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "break_builds", "-p", "no:cacheprovider"]
    command += ["tests/test_fused_ops.py", "-k", "rms_norm"]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    if required:
        assert run.returncode == 1, output  # tests failed (not 2: no collection error hides the others)
        assert "KernelBuildError" in output and "compiler exploded on purpose" in output, output
        assert " skipped" not in output, output
    else:
        assert run.returncode == 0, output
        assert "fused CPU ops unavailable here" in output and " passed" not in output, output


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    # torch waits forever on the lock of a build whose process was killed; CI would hang, not fail.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "effinfer_stale_test" / "lock"
    fresh = tmp_path / "effinfer_fresh_test" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = stale.stat().st_mtime - build.STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    build._remove_stale_lock("effinfer_stale_test")
    build._remove_stale_lock("effinfer_fresh_test")
    assert not stale.exists()
    assert fresh.exists()
