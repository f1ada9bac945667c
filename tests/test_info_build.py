"""``fastcon info`` and the native kernel's build on first use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastcon.backends import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_lists_every_backend_and_the_auto_choice():
    proc = subprocess.run([sys.executable, "-m", "fastcon", "info"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("triton", "native", "blockwise", "reference"):
        assert f"\n  {name} " in out, out
    for key in ("torch", "triton", "block memory", "build cache", "auto on cpu"):
        assert key in out, out
    import fastcon.native

    expected = "native" if fastcon.native.is_available() else "blockwise"
    assert any(line.split() == ["auto", "on", "cpu", expected] for line in out.splitlines()), out


def test_cache_key_follows_torch_version_and_sources(tmp_path, monkeypatch):
    src = tmp_path / "kernels"
    src.mkdir()
    (src / "contrastive.cpp").write_text("int x;")
    monkeypatch.setenv("FASTCON_CACHE_DIR", str(tmp_path / "cache"))
    first = build.cached_library(src)
    assert first.parent.parent == tmp_path / "cache" / "native"
    import torch

    assert torch.__version__.replace("+", "_") in first.parent.name
    (src / "contrastive.cpp").write_text("int y;")
    assert build.cached_library(src) != first  # changed sources: another build
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert "torch-0.0.0-" in build.cached_library(src).parent.name


def test_no_compiler_gives_one_line_notice_and_no_library(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTCON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "compiler", lambda: None)
    path, why = build.build_native()
    assert path is None and "no C++ compiler" in why
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blockwise" in err[0] and err[0].startswith("fastcon:")


def test_failed_build_is_reported_with_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTCON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "compiler", lambda: "/bin/false")
    path, why = build.build_native()
    assert path is None and "build failed" in why
    assert (build.cached_library(build.source_dir()).parent / "build.log").is_file()
    assert not build.cached_library(build.source_dir()).exists()


def test_build_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTCON_NATIVE_BUILD", "0")
    assert build.build_native() == (None, "FASTCON_NATIVE_BUILD=0 turns the build off")


def test_sources_are_found():
    src = build.source_dir()
    assert src is not None and (src / "contrastive.cpp").is_file() and (src / "tile_math.h").is_file()


@pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler on this machine")
def test_native_available_where_a_compiler_is():
    """With g++ present, the package alone (no cmake step) gives the native backend."""
    import fastcon.native

    assert fastcon.native.is_available(), fastcon.native.import_error()
