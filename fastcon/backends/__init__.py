"""The backends, in one registry.

Each :class:`Backend` says on which device types it runs, whether it is available here
and why not, and builds its engine for the user's dtype. ``"auto"`` picks the first
available backend for the device in the registry's order; an explicit backend that
cannot run raises an error naming the reason. The API, the distributed path and the
benchmarks all resolve backends here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple  # device types it runs on ("cpu", "cuda")
    summary: str
    _check: Callable[[], Optional[str]]  # None when usable, else why not
    _engine: Optional[Callable]  # input dtype -> engine (None: the dense reference)
    auto_for: tuple = ()  # device types on which "auto" may pick it

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run in this process, else why it cannot."""
        return self._check()

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def runs_on(self, device: torch.device) -> bool:
        return device.type in self.devices

    def engine(self, input_dtype: torch.dtype):
        """The engine for features of ``input_dtype`` (None for the reference)."""
        return None if self._engine is None else self._engine(input_dtype)


def _always() -> Optional[str]:
    return None


def _native_check() -> Optional[str]:
    from . import native

    return None if native.is_available() else f"the compiled CPU kernel is not loaded: {native.import_error()}"


_TRITON_STATUS: list = []  # [None or why not], filled on first use (torch.compile traces the read)


def _triton_check() -> Optional[str]:
    if not _TRITON_STATUS:
        try:
            importlib.import_module("fastcon.backends.triton.engine")
            _TRITON_STATUS.append(None)
        except Exception as exc:  # noqa: BLE001 - triton missing or too old: say why
            _TRITON_STATUS.append(f"triton cannot be imported: {type(exc).__name__}: {exc}")
    return _TRITON_STATUS[0]


def _blockwise(_dtype):
    from .blockwise import BlockwiseEngine

    return BlockwiseEngine()


def _native(_dtype):
    from .native import NativeEngine

    return NativeEngine()


def _triton(dtype):
    if dtype == torch.float64:  # float64 has no tensor cores: the blockwise engine checks in float64
        return _blockwise(dtype)
    from .triton.engine import TritonEngine

    return TritonEngine(dtype)


# "auto" takes the first available entry that runs on the device and lists it in auto_for.
REGISTRY = {
    b.name: b
    for b in (
        Backend("triton", ("cuda",), "fused Triton kernels (GPU)", _triton_check, _triton, ("cuda",)),
        Backend("native", ("cpu",), "compiled C++ kernel (CPU)", _native_check, _native, ("cpu",)),
        Backend("blockwise", ("cpu", "cuda"), "blocks of whole rows in PyTorch (any device)", _always, _blockwise,
                ("cpu", "cuda")),
        Backend("reference", ("cpu", "cuda"), "dense PyTorch with autograd: O(N^2) memory", _always, None),
    )
}
NAMES = ("auto",) + tuple(REGISTRY)


def triton_interpreted() -> bool:
    """Whether the Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    if _triton_check() is not None:
        return False
    from .triton.engine import interpreter_enabled

    return interpreter_enabled()


def auto(device: torch.device) -> Backend:
    """The backend ``"auto"`` stands for on ``device``."""
    device = torch.device(device)
    for b in REGISTRY.values():
        if device.type in b.auto_for and b.available:
            return b
    return REGISTRY["blockwise"]


def resolve(name: str, device: torch.device) -> Backend:
    """The backend for ``name`` on ``device``; raises if it cannot run there, saying why."""
    device = torch.device(device)
    if name == "auto":
        return auto(device)
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(map(repr, NAMES))}, got {name!r}")
    b = REGISTRY[name]
    why = b.unavailable_reason()
    if why is not None:
        raise RuntimeError(f"backend={name!r} is not available: {why}")
    if not b.runs_on(device) and not (name == "triton" and triton_interpreted()):
        raise RuntimeError(f"backend={name!r} runs on {' or '.join(b.devices)} tensors only; got tensors on {device}")
    return b


def engine_for(name: str, device: torch.device, input_dtype: torch.dtype):
    """``(backend, engine)`` for the features' device and dtype (engine None: the reference)."""
    b = resolve(name, device)
    return b, b.engine(input_dtype)


__all__ = ["Backend", "REGISTRY", "NAMES", "auto", "resolve", "engine_for", "triton_interpreted"]
