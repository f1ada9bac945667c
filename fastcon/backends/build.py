"""Compiles fastcon's native CPU kernel on first use, against the torch that is running.

The kernel is C++ against torch's ABI, so it must be built with the headers and libraries of
the installed torch (not of a build-isolation environment). The first time the ``native``
backend is asked for (``backend="auto"`` on CPU included), the sources shipped with the package
(``kernels/`` in a source tree, ``fastcon/_kernels`` in an installed wheel) are compiled with
the C++ compiler (``$CXX``, else ``g++``, ``c++``, ``clang++``) into a cache directory keyed by
the torch version and the sources' hash:

    ``$FASTCON_CACHE_DIR`` or ``$XDG_CACHE_HOME/fastcon`` or ``~/.cache/fastcon``, then
    ``native/torch-<version>-<hash>/libfastcon_native.so``

One line on stderr says so (about a minute on two cores); later processes load the cached
library. Concurrent processes (pytest-xdist, torchrun) wait on a file lock instead of building
twice. Without a compiler, or when the build fails, one line says why and ``auto`` uses the
blockwise backend; the compiler's output is kept in ``build.log`` next to where the library
would be. ``FASTCON_NATIVE_BUILD=0`` turns the build off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

LIBRARY_NAME = "libfastcon_native.so"
DRIVER_SOURCE = "contrastive.cpp"
TILE_MATH_SOURCE = "tile_math_isa.cpp"  # compiled once per instruction set, -DFASTCON_ISA naming it
AVX2_FLAGS = ["-mavx2", "-mfma"]  # the avx2 copy is only called where the CPU has both
FLAGS = ["-O3", "-DNDEBUG", "-std=c++20", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall",
         "-Wno-unused-function"]


def source_dir() -> Optional[Path]:
    """The kernel sources: in the installed package, else in the source tree."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_kernels", package.parent / "kernels"):
        if (candidate / DRIVER_SOURCE).is_file():
            return candidate
    return None


def cache_root() -> Path:
    if os.environ.get("FASTCON_CACHE_DIR"):
        return Path(os.environ["FASTCON_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastcon"


def compiler() -> Optional[str]:
    for name in ([os.environ["CXX"]] if os.environ.get("CXX") else []) + ["g++", "c++", "clang++"]:
        found = shutil.which(name)
        if found:
            return found
    return None


def uses_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cached_library(src: Path) -> Path:
    """Where the library built from ``src`` for this torch lives (built or not)."""
    digest = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{torch.__version__}|{torch._C._GLIBCXX_USE_CXX11_ABI}|{sys.version_info[:2]}|{FLAGS}".encode())
    key = f"torch-{torch.__version__.replace('+', '_')}-{digest.hexdigest()[:12]}"
    return cache_root() / "native" / key / LIBRARY_NAME


def _commands(cxx: str, src: Path, out_dir: Path, library: Path):
    torch_dir = Path(torch.__file__).resolve().parent
    includes = ["-I" + str(src), "-I" + str(torch_dir / "include"),
                "-I" + str(torch_dir / "include" / "torch" / "csrc" / "api" / "include")]
    common = FLAGS + includes + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    units = [(DRIVER_SOURCE, "contrastive.o", []),  # (source, object, its own flags)
             (TILE_MATH_SOURCE, "tile_math_base.o", ["-DFASTCON_ISA=base"])]
    if uses_avx2():
        common.append("-DFASTCON_HAVE_AVX2")
        units.append((TILE_MATH_SOURCE, "tile_math_avx2.o", ["-DFASTCON_ISA=avx2", *AVX2_FLAGS]))
    compiles = [[cxx, *common, *extra, "-c", str(src / source), "-o", str(out_dir / obj)]
                for source, obj, extra in units]
    lib_dir = str(torch_dir / "lib")
    link = [cxx, "-shared", "-fopenmp", *(c[-1] for c in compiles), "-L" + lib_dir, "-ltorch_cpu", "-lc10",
            "-Wl,-rpath," + lib_dir, "-o", str(library)]
    return compiles, link


def _run_all(commands, log) -> bool:
    """Run the compile commands two at a time; ``False`` at the first failure."""
    pending = list(commands)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in batch]
        ok = True
        for cmd, proc in zip(batch, procs):
            out, _ = proc.communicate()
            log.write(" ".join(cmd) + "\n" + out + "\n")
            ok = ok and proc.returncode == 0
        if not ok:
            return False
    return True


def _notice(message: str) -> None:
    print(f"fastcon: {message}", file=sys.stderr, flush=True)


def build_native() -> tuple[Optional[Path], str]:
    """The path of a native library for this torch, building it if needed, or ``(None, why)``."""
    if os.environ.get("FASTCON_NATIVE_BUILD", "1") == "0":
        return None, "FASTCON_NATIVE_BUILD=0 turns the build off"
    src = source_dir()
    if src is None:
        return None, "the kernel sources (kernels/ or fastcon/_kernels) are not installed"
    library = cached_library(src)
    if library.is_file():
        return library, ""
    cxx = compiler()
    if cxx is None:
        reason = "no C++ compiler found (install g++ or set CXX)"
        _notice(f"native CPU kernel unavailable: {reason}; using the blockwise backend")
        return None, reason
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create the cache directory {library.parent}: {exc}"
    import fcntl

    with open(library.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
        if library.is_file():
            return library, ""
        _notice(f"compiling the native CPU kernel for torch {torch.__version__} with {cxx} "
                f"(once, about a minute) into {library.parent}")
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp, \
                open(library.parent / "build.log", "w") as log:
            staged = Path(tmp) / LIBRARY_NAME
            compiles, link = _commands(cxx, src, Path(tmp), staged)
            if not (_run_all(compiles, log) and _run_all([link], log)):
                reason = f"the build failed (see {library.parent / 'build.log'})"
                _notice(f"native CPU kernel unavailable: {reason}; using the blockwise backend")
                return None, reason
            os.replace(staged, library)
    return library, ""
