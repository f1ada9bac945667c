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

from .common import Engine

LIBRARY_NAME = "libfastcon_native.so"

_loaded: Optional[bool] = None
_error = ""


def library_candidates() -> list:
    """Where the library is looked for, in order."""
    env = os.environ.get("FASTCON_NATIVE_LIB")
    if env:
        return [Path(env)]
    package = Path(__file__).resolve().parent.parent
    return [package / LIBRARY_NAME, package.parent / "build" / LIBRARY_NAME]


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
        torch.ops.fastcon_native.stats  # noqa: B018 - the ops must be registered
        torch.ops.fastcon_native.grads  # noqa: B018
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


def _op(name: str):
    return getattr(torch.ops.fastcon_native, name)


class NativeEngine(Engine):
    """Engine interface of :mod:`fastcon.backends.common` on the compiled kernel (float32 or
    float64 rows; half-precision users are computed in float32)."""

    name = "native"

    def block_stats(self, anchors, contrast, self_offset, definition, dense=None):
        symmetric = anchors is contrast
        k = definition.kernel_scalars()
        positive_rules = definition.merge_rules(definition.positive_slots)
        if dense is None:
            dense_rules = definition.merge_rules(definition.dense_slots)
            if definition.positive_reads_dense:
                positive_rules = []
        else:
            dense_rules = []
        out = _op("stats")(anchors.x, contrast.x, anchors.ranks, contrast.ranks,
                           -1 if self_offset is None else self_offset, symmetric, definition.kernel_id,
                           definition.temperature, k["beta"], k["gamma"], dense_rules, positive_rules,
                           None if dense is None else dense.to(anchors.x.dtype).contiguous())
        nd = len(dense_rules)
        return (out[:nd] if dense is None else None), (out[nd:] if positive_rules else None)

    def block_grads(self, anchors, contrast, self_offset, definition, params, contrast_rows):
        symmetric = anchors is contrast
        k = definition.kernel_scalars()
        grad_a, grad_c = _op("grads")(anchors.x, contrast.x, anchors.ranks, contrast.ranks,
                                      -1 if self_offset is None else self_offset, symmetric, definition.kernel_id,
                                      definition.temperature, k["beta"], k["gamma"],
                                      params.to(anchors.x.dtype).contiguous(), 0 if symmetric else contrast_rows)
        return grad_a, (None if symmetric or contrast_rows == 0 else grad_c)
