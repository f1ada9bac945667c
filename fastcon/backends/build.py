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

A library is only published once it is a whole ELF file that a fresh Python process loads
without dying, and its digest goes next to it, in ``libfastcon_native.so.sha256`` (which
``sha256sum -c`` reads). A cached library that does not match its record (truncated by a full
disk or a killed copy, overwritten, or built by an older fastcon) is never handed to the dynamic
loader, which would kill the process with SIGBUS rather than raise: it is compiled again, or,
where that is not possible (no compiler, a read-only cache), skipped with one line on stderr.
Waits are bounded: ``BUILD_TIMEOUT_S`` per compiler command and for another process's build.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

LIBRARY_NAME = "libfastcon_native.so"
RECORD_SUFFIX = ".sha256"  # the library's digest, written when it is built
DRIVER_SOURCE = "contrastive.cpp"
TILE_MATH_SOURCE = "tile_math_isa.cpp"  # compiled once per instruction set, -DFASTCON_ISA naming it
AVX2_FLAGS = ["-mavx2", "-mfma"]  # the avx2 copy is only called where the CPU has both
FLAGS = ["-O3", "-DNDEBUG", "-std=c++20", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall",
         "-Wno-unused-function"]
BUILD_TIMEOUT_S = 900  # per compiler command, and the longest wait for another process's build
PROBE_TIMEOUT_S = 300  # a fresh Python importing torch and loading the new library


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


def record_path(library: Path) -> Path:
    return library.with_name(library.name + RECORD_SUFFIX)


def write_record(library: Path, record: Path) -> None:
    """Write ``library``'s digest to ``record`` (in ``sha256sum`` format, naming the cached library)."""
    staged = record.with_name(record.name + ".tmp")
    staged.write_text(f"{hashlib.sha256(library.read_bytes()).hexdigest()}  {LIBRARY_NAME}\n")
    os.replace(staged, record)


def verify_cached(library: Path) -> str:
    """"" when the cached ``library`` has the digest recorded when it was built, else what is wrong."""
    try:
        recorded = record_path(library).read_text().split()
    except FileNotFoundError:
        return (check_library(library) or "it has no build record") if library.exists() else "it is not built"
    except OSError as exc:
        return f"its build record cannot be read: {exc}"
    try:
        digest = hashlib.sha256(library.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "it is not built"
    except OSError as exc:
        return f"it cannot be read: {exc}"
    if not recorded or recorded[0] != digest:
        return "it differs from its build record: truncated or overwritten"
    return ""


_ELF_LAYOUT = {  # EI_CLASS -> (header fields from offset 16, program header, section header)
    1: ("HHIIIIIHHHHHH", "IIIIIIII", "IIIIIIIIII"),
    2: ("HHIQQQIHHHHHH", "IIQQQQQQ", "IIQQQQIIQQ"),
}


def check_library(path: Path) -> str:
    """"" when ``path`` is a whole ELF shared library, else what is wrong with it.

    The dynamic loader maps a library's segments without reading them: a truncated file does not
    raise, the process dies of SIGBUS when a page past its end is touched. So every segment and
    section must lie within the file before it is loaded.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"it cannot be read: {exc}"
    if not data:
        return "it is empty (0 bytes)"
    if data[:4] != b"\x7fELF" or data[4] not in _ELF_LAYOUT or data[5] not in (1, 2) or len(data) < 64:
        return "it is not an ELF shared library"
    header, program, section = (("<" if data[5] == 1 else ">") + f for f in _ELF_LAYOUT[data[4]])
    fields = struct.unpack_from(header, data, 16)
    e_type, phoff, shoff = fields[0], fields[4], fields[5]
    phentsize, phnum, shentsize, shnum = fields[8:12]
    if e_type != 3:  # ET_DYN
        return "it is an ELF file but not a shared library"
    size = len(data)
    if phnum == 0 or phentsize < struct.calcsize(program) or phoff + phnum * phentsize > size:
        return f"its program headers lie past its end ({size} bytes): truncated"
    for i in range(phnum):
        p = struct.unpack_from(program, data, phoff + i * phentsize)
        offset, filesz = (p[1], p[4]) if data[4] == 1 else (p[2], p[5])
        if offset + filesz > size:
            return f"its segments reach byte {offset + filesz} but it has {size}: truncated"
    if shoff:
        if shentsize < struct.calcsize(section) or shoff + max(shnum, 1) * shentsize > size:
            return f"its section headers lie past its end ({size} bytes): truncated"
        for i in range(shnum):
            s = struct.unpack_from(section, data, shoff + i * shentsize)
            if s[1] != 8 and s[4] + s[5] > size:  # 8: SHT_NOBITS takes no room in the file
                return f"its sections reach byte {s[4] + s[5]} but it has {size}: truncated"
    return ""


def _probe(library: Path) -> str:
    """"" unless loading ``library`` kills or hangs a fresh Python process (what it would do here)."""
    if not os.path.basename(sys.executable or "").startswith("python"):
        return ""  # embedded or frozen: sys.executable is not an interpreter to run code with
    code = "import sys, torch; torch.ops.load_library(sys.argv[1]); torch.ops.fastcon_native.stats"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(library)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"loading it did not finish in {PROBE_TIMEOUT_S} s"
    except OSError:
        return ""  # no process to probe with: the load here is checked as before
    if proc.returncode < 0:
        return f"loading it kills the process (signal {-proc.returncode})"
    return ""


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
    """Run the compile commands two at a time; ``False`` at the first failure or timeout."""
    pending = list(commands)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in batch]
        ok = True
        for cmd, proc in zip(batch, procs):
            try:
                out, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out = proc.communicate()[0] + f"\nstopped after {BUILD_TIMEOUT_S} s\n"
            log.write(" ".join(cmd) + "\n" + out + "\n")
            ok = ok and proc.returncode == 0
        if not ok:
            return False
    return True


def notice(message: str) -> None:
    """One line on stderr, begun on a line of its own (a progress bar may have left one unfinished)."""
    sys.stderr.write("\nfastcon: " + " ".join(message.split()) + "\n")
    sys.stderr.flush()


def _unavailable(reason: str) -> tuple[None, str]:
    notice(f"native CPU kernel unavailable: {reason}; using the blockwise backend")
    return None, reason


def _lock(lock) -> None:
    """Wait for another process's build, at most ``BUILD_TIMEOUT_S``."""
    import fcntl

    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"another process has held {lock.name} for {BUILD_TIMEOUT_S} s") from None
            time.sleep(0.5)


def build_native() -> tuple[Optional[Path], str]:
    """The path of a native library for this torch, building it if needed, or ``(None, why)``.

    The library returned matches its build record, so it can be loaded; anything that stops
    the build (no compiler, a read-only or full cache, a failed compile) gives ``(None, why)``
    and one line on stderr, never an exception.
    """
    if os.environ.get("FASTCON_NATIVE_BUILD", "1") == "0":
        return None, "FASTCON_NATIVE_BUILD=0 turns the build off"
    src = source_dir()
    if src is None:
        return _unavailable("the kernel sources (kernels/ or fastcon/_kernels) are not installed")
    try:
        library = cached_library(src)
    except OSError as exc:
        return _unavailable(f"the kernel sources in {src} cannot be read: {exc}")
    damage = verify_cached(library)
    if not damage:
        return library, ""
    # a library that is there but fails its record is never loaded: rebuilt here, or skipped
    unusable = f"the cached {library} is unusable ({damage}) and " if library.exists() else ""
    cxx = compiler()
    if cxx is None:
        return _unavailable(f"{unusable}no C++ compiler found (install g++ or set CXX)")
    try:
        return _build(cxx, src, library)
    except OSError as exc:  # read-only or full cache, no locking on its file system, a lock held too long
        return _unavailable(f"{unusable}the kernel cannot be built in {library.parent}: {exc}")


def _build(cxx: str, src: Path, library: Path) -> tuple[Optional[Path], str]:
    library.parent.mkdir(parents=True, exist_ok=True)
    with open(library.parent / "build.lock", "a") as lock:
        _lock(lock)
        damage = verify_cached(library)  # another process may have built it while this one waited
        if not damage:
            return library, ""
        again = f"the cached library is unusable ({damage}); " if library.exists() else ""
        notice(f"{again}compiling the native CPU kernel for torch {torch.__version__} with {cxx} "
               f"(once, about a minute) into {library.parent}")
        log_path = library.parent / "build.log"
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp, open(log_path, "w") as log:
            staged = Path(tmp) / LIBRARY_NAME
            compiles, link = _commands(cxx, src, Path(tmp), staged)
            if not (_run_all(compiles, log) and _run_all([link], log)):
                return _unavailable(f"the build failed (see {log_path})")
            problem = check_library(staged) or _probe(staged)
            if problem:
                log.write(f"the built library is not used: {problem}\n")
                return _unavailable(f"the built library is not used: {problem} (see {log_path})")
            write_record(staged, record_path(library))
            os.replace(staged, library)
    return library, ""
