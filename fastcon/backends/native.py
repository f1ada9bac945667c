"""Loader and engine of the compiled CPU kernel (sources in ``kernels/``).

The library is looked for, in order: ``$FASTCON_NATIVE_LIB`` (only there, when set);
``fastcon/libfastcon_native.so`` and ``build/libfastcon_native.so`` (a CMake build:
``cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2``); the build
cache, where :mod:`.build` compiles it on first use against the running torch. Without it
fastcon works as before (``backend="auto"`` falls back to the blockwise path),
:func:`import_error` says why, and one line on stderr says so once per process (unless
``FASTCON_NATIVE_BUILD=0`` asked for it).

A library is checked before the dynamic loader sees it (a truncated one would kill the process
with SIGBUS rather than raise): it must be a whole ELF file, and a cached one must match the
digest recorded when it was built. The loader runs once per process as plain Python, also when
its first caller is being traced by ``torch.compile``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..losses import Counts
from .build import LIBRARY_NAME, build_native, check_library, notice
from .common import Engine, Prepared, joined_labels, unlabelled_rows

_loaded: Optional[bool] = None
_error = ""
_location: Optional[Path] = None


def _eager(fn):
    """``fn`` runs as plain Python inside ``torch.compile`` too, its result a constant of the graph:
    Dynamo cannot trace file-system calls or ``dlopen``, and whether the kernel loads is a
    fact of the process."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # what that sets, without importing Dynamo here (2 s)
    return fn


def library_candidates() -> list:
    """Prebuilt libraries looked for before the build cache, in order."""
    env = os.environ.get("FASTCON_NATIVE_LIB")
    if env:
        return [Path(env)]
    package = Path(__file__).resolve().parent.parent
    return [package / LIBRARY_NAME, package.parent / "build" / LIBRARY_NAME]


def _try_load(path: Path) -> str:
    """"" when ``path`` loads and registers the ops, else why not."""
    problem = check_library(path)
    if problem:
        return f"{path}: {problem}"
    try:
        torch.ops.load_library(str(path))
        torch.ops.fastcon_native.stats  # noqa: B018 - the ops must be registered
        torch.ops.fastcon_native.grads  # noqa: B018
        torch.ops.fastcon_native.prepare  # noqa: B018
        torch.ops.fastcon_native.finish  # noqa: B018
    except (OSError, RuntimeError, AttributeError) as exc:
        return f"{path}: {exc}"
    return ""


@_eager
def _load() -> bool:
    global _loaded, _error, _location
    if _loaded is not None:
        return _loaded
    env = os.environ.get("FASTCON_NATIVE_LIB")
    errors = []
    for path in library_candidates():
        if not path.is_file() and not env:
            continue  # the prebuilt libraries are optional
        error = _try_load(path) if path.is_file() else f"{path} is not a file"
        if not error:
            _loaded, _error, _location = True, "", path
            return True
        errors.append(f"FASTCON_NATIVE_LIB={error}" if env else error)
        if not env:
            notice(f"skipping the native library {error}")
    if env:
        notice(f"native CPU kernel unavailable: {errors[0]}; using the blockwise backend")
    else:
        built, why = build_native()  # says on stderr why when it gives no library
        error = _try_load(built) if built is not None else why
        if not error:
            _loaded, _error, _location = True, "", built
            return True
        if built is not None:
            notice(f"native CPU kernel unavailable: {error}; using the blockwise backend")
        errors.append(error)
    _loaded, _error = False, "; ".join(errors)
    return False


def is_available() -> bool:
    """Whether the compiled kernel is built (or could be built now) and loads."""
    return _load()


def import_error() -> str:
    """Why the compiled kernel is unavailable ("" when it is available)."""
    _load()
    return _error


def location() -> Optional[Path]:
    """The library that was loaded (``None`` when unavailable)."""
    _load()
    return _location


def _op(name: str):
    return getattr(torch.ops.fastcon_native, name)


class NativeEngine(Engine):
    """Engine interface of :mod:`fastcon.backends.common` on the compiled kernel (float32 or
    float64 rows; half-precision users are computed in float32). Preparing the rows (flatten,
    normalise, rank the labels, count each anchor's class) and returning their gradients are
    one compiled operator each, so a small problem costs few dispatches."""

    name = "native"

    def prepare(self, features, labels, ref, ref_labels, num_anchors, normalize):
        x, inv, ranks, n_pos, n_neg = _op("prepare")(features, ref, joined_labels(labels, ref_labels),
                                                     unlabelled_rows(ref, ref_labels), num_anchors, bool(normalize))
        k = x.shape[0]
        counts = Counts(n_pos, n_neg, k)
        m = k - (0 if ref is None else ref.shape[0])
        return Prepared(x, ranks, m, num_anchors, inv if normalize else None, counts, features, ref)

    def finish(self, prep, grad_x, features, ref, scale=1.0):
        grad_f, grad_r = _op("finish")(grad_x.contiguous(), prep.x[: grad_x.shape[0]], prep.inv_norm, features, ref,
                                       scale, ref is not None)
        return grad_f, (grad_r if grad_r.numel() or (ref is not None and grad_x.shape[0] > prep.num_rows) else None)

    def reduced(self, prep, definition, mean, need_f, need_r):
        want = need_f or need_r
        row_loss, valid, _, grad = self.forward(prep, definition, want, need_r)
        n_valid = valid.sum()
        total = row_loss.sum()
        divisor = float(max(int(n_valid), 1)) if mean else 1.0  # CPU tensors: reading one is free
        grad_f = grad_r = None
        if want:  # the divisor goes into the compiled epilogue
            grad_f, grad_r = self.finish(prep, grad, prep.features, prep.ref, 1.0 / divisor)
        return (total / divisor if mean else total), n_valid, (grad_f if need_f else None), \
            (grad_r if need_r else None)

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
