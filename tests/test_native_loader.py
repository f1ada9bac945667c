"""The native kernel's loader and its build cache under faults: a truncated, empty, foreign or
unwritable library never crashes, hangs or silently disables the kernel.

Every test points ``FASTCON_CACHE_DIR`` at a temporary directory; the user's cache only gives the
good library (``good_library``: the kernel as the other native tests load it). Where a library must be built, a fake compiler copies the good one
(``_fake_compiler``); only ``test_real_build_records_and_loads_the_library`` runs the real compiler.
Loading a second copy of the kernel in the test process would register its operators twice, so
every test that loads one runs a fresh Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcon import backends
from fastcon.backends import build, native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a shared library that every torch install has: its truncated copies stand for a damaged cache
SOME_LIBRARY = Path(torch.__file__).resolve().parent / "lib" / "libc10.so"


@pytest.fixture(scope="module")
def good_library():
    where = native.location()
    if where is None:
        pytest.skip(f"the native kernel is unavailable here: {native.import_error()}")
    return where


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Where this test's library would be cached (the directory is not created)."""
    monkeypatch.setenv("FASTCON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCON_NATIVE_LIB", raising=False)
    monkeypatch.delenv("FASTCON_NATIVE_BUILD", raising=False)
    return build.cached_library(build.source_dir())


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as in a new process, with no prebuilt library to find before the cache."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_error", "")
    monkeypatch.setattr(native, "_location", None)
    monkeypatch.setattr(native, "library_candidates", lambda: [])


def _fake_compiler(tmp_path, good_library) -> str:
    """A "compiler" whose link step copies the good library (a build in milliseconds)."""
    script = tmp_path / "fake-cxx"
    script.write_text('#!/bin/sh\nout=""; shared=0\n'
                      'while [ $# -gt 0 ]; do\n'
                      '  case "$1" in -o) out="$2"; shift;; -shared) shared=1;; esac; shift\n'
                      'done\n'
                      f'if [ $shared = 1 ]; then cp "{good_library}" "$out"; else : > "$out"; fi\n')
    script.chmod(0o755)
    return str(script)


def _notices(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("fastcon:")]


def _one_notice(err: str) -> str:
    notices = _notices(err)
    assert len(notices) == 1, err
    assert "\n" + notices[0] in err, repr(err)  # begun on a line of its own, even as stderr's first
    return notices[0]


def _python(code: str, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT, **env))


def _truncated(path: Path, source: Path, keep: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source.read_bytes()[:keep])
    return path


# ---- the check made before the dynamic loader sees a file -------------------------------------

def test_check_library_accepts_a_whole_library_and_names_what_is_wrong_with_others(tmp_path):
    assert build.check_library(SOME_LIBRARY) == ""
    size = SOME_LIBRARY.stat().st_size
    for keep in (100, 4096, size // 2, size - 100):
        assert "truncated" in build.check_library(_truncated(tmp_path / f"cut{keep}.so", SOME_LIBRARY, keep))
    (tmp_path / "empty.so").write_bytes(b"")
    assert "empty" in build.check_library(tmp_path / "empty.so")
    (tmp_path / "text.so").write_text("not a library\n" * 100)
    assert "not an ELF" in build.check_library(tmp_path / "text.so")
    assert "cannot be read" in build.check_library(tmp_path / "missing.so")


# ---- a damaged cached library -----------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "differs from its record"])
def test_damaged_cached_library_is_skipped_with_one_notice_when_it_cannot_be_rebuilt(cache, damage, monkeypatch,
                                                                                    capsys):
    if damage == "truncated":
        _truncated(cache, SOME_LIBRARY, 100_000)  # no record either, as a killed copy leaves it
    else:
        _truncated(cache, SOME_LIBRARY, SOME_LIBRARY.stat().st_size)
        build.record_path(cache).write_text("0" * 64 + "  libfastcon_native.so\n")
    monkeypatch.setattr(build, "compiler", lambda: None)
    path, why = build.build_native()
    assert path is None and "unusable" in why and "no C++ compiler" in why, why
    notice = _one_notice(capsys.readouterr().err)
    assert str(cache) in notice and "blockwise" in notice and damage.split()[0] in notice, notice


@pytest.mark.slow
def test_truncated_cached_library_is_rebuilt_in_a_fresh_process(cache, tmp_path, good_library):
    """What killed every process with SIGBUS: a truncated library in the cache."""
    _truncated(cache, good_library, good_library.stat().st_size // 2)
    proc = _python("import fastcon.native as n; print(n.is_available(), n.location())",
                   {"FASTCON_CACHE_DIR": os.environ["FASTCON_CACHE_DIR"],
                    "CXX": _fake_compiler(tmp_path, good_library)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["True", str(cache)], proc.stdout + proc.stderr
    notice = _one_notice(proc.stderr)
    assert "unusable" in notice and "truncated" in notice and "compiling" in notice, notice
    assert cache.read_bytes() == good_library.read_bytes()
    assert build.verify_cached(cache) == ""


@pytest.mark.slow
def test_truncated_prebuilt_library_is_skipped_for_the_cached_one(cache, tmp_path, good_library):
    cache.parent.mkdir(parents=True)
    shutil.copyfile(good_library, cache)
    build.write_record(cache, build.record_path(cache))
    prebuilt = _truncated(tmp_path / "build" / "libfastcon_native.so", good_library, 100_000)
    proc = _python("import sys; from pathlib import Path; from fastcon.backends import native\n"
                   "native.library_candidates = lambda: [Path(sys.argv[1])]\n"
                   "print(native.is_available(), native.location())",
                   {"FASTCON_CACHE_DIR": os.environ["FASTCON_CACHE_DIR"]}, str(prebuilt))
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["True", str(cache)], proc.stdout + proc.stderr
    notice = _one_notice(proc.stderr)
    assert "skipping" in notice and str(prebuilt) in notice and "truncated" in notice, notice


# ---- what the loader says when no library can be used -----------------------------------------

def test_empty_cached_library_is_not_silent(cache, fresh_loader, monkeypatch, capsys):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    monkeypatch.setattr(build, "compiler", lambda: None)
    assert not native.is_available()
    assert "empty" in native.import_error(), native.import_error()
    assert "empty" in _one_notice(capsys.readouterr().err)


@pytest.mark.parametrize("content", [b"\x00garbage" * 64, None])
def test_unusable_native_lib_variable_is_not_silent(tmp_path, fresh_loader, monkeypatch, capsys, content):
    path = tmp_path / "lib.so"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("FASTCON_NATIVE_LIB", str(path))
    monkeypatch.setattr(native, "library_candidates", lambda: [path])
    assert not native.is_available()
    assert native.import_error().startswith(f"FASTCON_NATIVE_LIB={path}"), native.import_error()
    notice = _one_notice(capsys.readouterr().err)
    assert f"FASTCON_NATIVE_LIB={path}" in notice and "blockwise" in notice, notice


# ---- a cache that cannot be written ------------------------------------------------------------

def _assert_auto_falls_back(capsys):
    assert backends.auto("cpu").name == "blockwise"
    assert "cannot be built" in native.import_error(), native.import_error()
    notice = _one_notice(capsys.readouterr().err)
    assert "cannot be built" in notice and "blockwise" in notice, notice


def test_cache_where_the_lock_cannot_be_opened_falls_back_to_blockwise(cache, fresh_loader, capsys):
    (cache.parent / "build.lock").mkdir(parents=True)  # fails to open as a read-only directory does
    _assert_auto_falls_back(capsys)


def test_read_only_cache_falls_back_to_blockwise(cache, fresh_loader, capsys):
    cache.parent.mkdir(parents=True)
    cache.parent.chmod(0o555)
    try:
        try:
            (cache.parent / "probe").touch()
        except PermissionError:
            _assert_auto_falls_back(capsys)
        else:
            pytest.skip("this user writes into read-only directories (root)")
    finally:
        cache.parent.chmod(0o755)


def test_build_held_by_another_process_is_waited_for_only_so_long(cache, fresh_loader, monkeypatch, capsys):
    import fcntl

    monkeypatch.setattr(build, "BUILD_TIMEOUT_S", 0.3)
    cache.parent.mkdir(parents=True)
    with open(cache.parent / "build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a build in another process would
        assert not native.is_available()
    assert "another process has held" in _one_notice(capsys.readouterr().err)


# ---- torch.compile as the first use in a process -----------------------------------------------

COMPILE_FIRST = """
import sys
import torch
import fastcon
from fastcon.backends import build

build.compiler = lambda: sys.argv[1]  # not $CXX, which Inductor would use too
if sys.argv[2] == "imported":
    import fastcon.native
x = torch.randn(6, 2, 8, dtype=torch.float64)
y = torch.tensor([0, 0, 1, 1, 2, 2])
compiled = torch.compile(lambda x, y: fastcon.SupConLoss()(x, y), fullgraph=True, backend="aot_eager")(x, y)
eager = fastcon.SupConLoss(backend="reference")(x, y)
torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
from fastcon.backends import native
print(native.location())
"""


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["imported", "imported while tracing"])
def test_compile_fullgraph_as_first_use_builds_and_loads_the_kernel(cache, tmp_path, good_library, loader):
    """The loader (here also the build) runs during tracing, as plain Python: Dynamo cannot trace it."""
    proc = _python(COMPILE_FIRST, {"FASTCON_CACHE_DIR": os.environ["FASTCON_CACHE_DIR"]},
                   _fake_compiler(tmp_path, good_library), loader, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(cache)], proc.stdout + proc.stderr  # the native backend ran
    assert "compiling" in _one_notice(proc.stderr)


# ---- the real build ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler on this machine")
def test_real_build_records_and_loads_the_library(cache):
    """About a minute: the compiler's own output is checked, recorded and loaded."""
    proc = _python("import fastcon.native as n; print(n.is_available(), n.location())",
                   {"FASTCON_CACHE_DIR": os.environ["FASTCON_CACHE_DIR"]}, timeout=1200)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", str(cache)], proc.stdout + proc.stderr
    assert build.verify_cached(cache) == "" and build.check_library(cache) == ""
    assert len(_notices(proc.stderr)) == 1, proc.stderr  # "compiling ..."
