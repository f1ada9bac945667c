"""``fastcon info`` (also ``python -m fastcon info``): what fastcon can run here and why.

Prints the versions (fastcon, Python, torch, Triton, timm), the devices, every backend of the
registry with whether it is available and why not, the backend ``backend="auto"`` picks per
device, where the native CPU kernel was loaded from and the CPU features it uses, and the
blockwise backend's block-memory setting. Attach it to bug reports.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        return f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _cpu_features() -> str:
    import torch

    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = [name for name in ("avx2", "fma", "avx512f") if name in flags]
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    return f"{platform.machine()}, {os.cpu_count()} logical CPUs, torch CPU capability {capability}" + \
        (f", flags {' '.join(wanted)}" if wanted else "")


def collect() -> list:
    """``(section, [(key, value), ...])`` pairs of everything ``info`` prints."""
    import torch

    import fastcon
    from . import backends
    from .backends import blockwise, build, native

    versions = [("fastcon", f"{getattr(fastcon, '__version__', '?')} ({os.path.dirname(fastcon.__file__)})"),
                ("python", sys.version.split()[0]), ("torch", torch.__version__), ("triton", _version("triton")),
                ("timm", _version("timm"))]
    devices = [("cpu", _cpu_features())]
    gpu = torch.cuda.is_available()
    if gpu:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append((f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"))
    elif torch.version.cuda:
        devices.append(("cuda", f"no GPU visible (this torch is built for CUDA {torch.version.cuda})"))
    else:
        devices.append(("cuda", "no GPU support in this torch build (CPU only)"))
    if os.environ.get("TRITON_INTERPRET") == "1":
        devices.append(("TRITON_INTERPRET", "1 (Triton kernels run on the CPU interpreter)"))
    present = {"cpu"} | ({"cuda"} if gpu else set())
    rows = [(b.name, _backend_status(b, present)) for b in backends.REGISTRY.values()]
    # the registry's rule for a CUDA tensor (it needs no GPU to answer)
    picks = [("auto on cpu", backends.auto("cpu").name),
             ("auto on cuda", backends.auto("cuda").name + ("" if gpu else " (what a GPU would run; none here)"))]
    where = native.location()
    native_rows = [("library", str(where) if where else f"none -- {native.import_error()}"),
                   ("sources", str(build.source_dir())), ("build cache", str(build.cache_root() / "native")),
                   ("compiler", build.compiler() or "none found"),
                   ("tile math", "AVX2 + FMA copy used where the CPU has both" if build.uses_avx2()
                    else "portable copy")]
    settings = [("block memory", f"{blockwise.get_block_memory() / 2**20:.0f} MiB per similarity block "
                                 "(fastcon.backends.blockwise.set_block_memory)"),
                ("torch threads", str(torch.get_num_threads()))]
    return [("versions", versions), ("devices", devices), ("backends", rows), ("backend='auto' picks", picks),
            ("native CPU kernel", native_rows), ("settings", settings)]


def _backend_status(backend, present: set) -> str:
    """Whether ``backend`` can run here, and on which of its devices, without claiming a
    device this machine does not have."""
    from .backends import triton_interpreted

    why = backend.unavailable_reason()
    if why is not None:
        return f"unavailable: {backend.summary} -- {why}"
    if backend.name == "triton" and "cuda" not in present and triton_interpreted():
        return f"ready on cpu through the Triton interpreter (TRITON_INTERPRET=1; slow): {backend.summary}"
    here = [d for d in backend.devices if d in present]
    elsewhere = [d for d in backend.devices if d not in present]
    if not here:
        return f"installed, not usable here (needs {'/'.join(elsewhere)}, none present): {backend.summary}"
    return (f"ready on {'/'.join(here)}" + (f" (also {'/'.join(elsewhere)} where present)" if elsewhere else "")
            + f": {backend.summary}")


def format_info(sections) -> str:
    lines = []
    for title, rows in sections:
        lines.append(f"{title}:")
        width = max(len(k) for k, _ in rows)
        lines.extend(f"  {k.ljust(width)}  {v}" for k, v in rows)
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, devices, backends and which one 'auto' picks",
                              description=__doc__.split("\n\n")[1])
    p.set_defaults(func=lambda args: print(format_info(collect())))
