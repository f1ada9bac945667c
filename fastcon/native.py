"""Loader and engine of the optional compiled CPU kernel (built from ``kernels/``).

Build it with ``cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2``
from the repository root; the library lands in ``fastcon/libfastcon_native.so``. The
environment variable ``FASTCON_NATIVE_LIB`` points at a library elsewhere. Without the
library fastcon works as before (``backend="auto"`` falls back to the blockwise path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

LIBRARY_NAME = "libfastcon_native.so"
_KIND_CODES = {"supcon": 0, "schane": 1, "focal": 2}

_loaded: Optional[bool] = None
_error = ""


def library_candidates() -> list:
    """Where the library is looked for, in order."""
    env = os.environ.get("FASTCON_NATIVE_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    return [here / LIBRARY_NAME, here.parent / "build" / LIBRARY_NAME]


def _load() -> bool:
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    candidates = library_candidates()
    found = [p for p in candidates if p.is_file()]
    if not found:
        _error = "no compiled library at " + ", ".join(str(p) for p in candidates)
        _loaded = False
        return False
    try:
        torch.ops.load_library(str(found[0]))
        torch.ops.fastcon.sweep  # noqa: B018 - the op must be registered
    except (OSError, RuntimeError, AttributeError) as exc:
        _error = f"{found[0]}: {exc}"
        _loaded = False
        return False
    _loaded = True
    return True


def is_available() -> bool:
    """Whether the compiled kernel is built and loads."""
    return _load()


def import_error() -> str:
    """Why the compiled kernel is unavailable ("" when it is available)."""
    _load()
    return _error


def _class_ids(labels, ref_labels):
    """Dense int32 class id of every contrast row (the kernel compares ids, not labels)."""
    y = labels if ref_labels is None else torch.cat([labels, ref_labels])
    return torch.unique(y, return_inverse=True)[1].to(torch.int32).contiguous()


def _run(z, ref, cls, num_anchors, spec, stats, row_weight, want_grad, need_ref_grad):
    return torch.ops.fastcon.sweep(
        z, ref, cls, num_anchors, _KIND_CODES[spec.kind], spec.temperature, spec.scale, spec.beta, spec.gamma,
        stats, row_weight, want_grad, need_ref_grad,
    )


class NativeEngine:
    """Engine interface of :class:`fastcon._function.ContrastiveFunction` on the compiled kernel.

    ``forward`` saves the class ids and the per-anchor statistics of the gradient
    (``[A, 4]``), so ``backward`` is the gradient pass alone.
    """

    name = "native"

    def forward(self, z, ref, labels, ref_labels, num_anchors, spec, want_grad, need_ref_grad):
        cls = _class_ids(labels, ref_labels)
        row_loss, valid, stats, grad_z, grad_ref = _run(
            z, ref, cls, num_anchors, spec, None, None, want_grad, need_ref_grad)
        if not want_grad:
            grad_z = grad_ref = None
        elif ref is None or not need_ref_grad:
            grad_ref = None
        return row_loss, valid, (cls, stats), grad_z, grad_ref

    def backward(self, z, ref, labels, ref_labels, num_anchors, spec, saved, row_weight, need_ref_grad):
        cls, stats = saved
        _, _, _, grad_z, grad_ref = _run(
            z, ref, cls, num_anchors, spec, stats, row_weight.contiguous(), True, need_ref_grad)
        return grad_z, (grad_ref if ref is not None and need_ref_grad else None)
