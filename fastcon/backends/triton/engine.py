"""Triton backend (host side): the engine of :mod:`fastcon.backends.common` on the kernels.

Single-device path. One kernel normalises the user's rows (float32 math), casts them to the
dot dtype (the user's bfloat16 / float16, else float32), pads D to a multiple of 16 and
writes them sorted by class (``x [K, DP]``: the only copy of the features). The statistics
kernel writes O(N) float32 numbers; the loss definition finalises them on the host; the
gradient kernel applies the normalisation's backward and stores the gradient in the user's
dtype and layout. Every row an anchor: one gradient sweep ``(G + G^T) x / t``. Otherwise
(``contrast_mode="one"``, extra contrast rows) an anchor-side sweep (float32 ``[A, DP]``)
and a contrast-side sweep that adds it. The coefficients of the gradient are divided by
their largest magnitude before the half-precision products (and multiplied back in float32
after), so large upstream weights (GradScaler) cannot overflow a float16 ``G``.

Precision: float32 rows are multiplied exactly (no TF32). Half-precision rows use tensor
cores with float32 accumulation and float32 softmax math. float64 runs on the blockwise
engine (the registry builds it). No ``torch.unique`` and no ``.item()``: nothing here waits
for the GPU. Kernels launch under the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...losses import Counts
from ..common import Engine, Prepared, Rows, label_ranks
from . import launch
from .launch import interpreter_enabled  # noqa: F401 - the registry asks here
from .sides import Side, grads, link_sides, merged_stats, sort_side, sorted_positions, subset_side

__all__ = ["TritonEngine", "interpreter_enabled"]


@dataclass
class TritonPrepared(Prepared):
    """A problem in the kernels' layout: ``x`` sorted by class (``cls``); ``order[p]`` is the flat
    index (batch rows, then ref rows) of sorted row p; ``anchors`` the anchors' side."""

    contrast_side: Optional[Side] = None
    anchor_side: Optional[Side] = None
    d: int = 0
    features: Optional[torch.Tensor] = None
    ref: Optional[torch.Tensor] = None


class TritonEngine(Engine):
    """Engine interface of :mod:`fastcon.backends.common` on the Triton kernels."""

    name = "triton"
    # One gradient sweep (G + G^T) when every row is an anchor; False forces the anchor-side +
    # contrast-side form (kept for tests and comparison).
    symmetric_sweep = True

    def __init__(self, input_dtype: torch.dtype = torch.float32):
        half = input_dtype in (torch.bfloat16, torch.float16)
        self.dot_dtype = input_dtype if half else torch.float32

    def dtype_for(self, input_dtype):
        return self.dot_dtype

    # --- single device -------------------------------------------------------------------
    def prepare(self, features, labels, ref, ref_labels, num_anchors, normalize):
        if launch.padded_dim(features.shape[-1]) > launch.MAX_DP:
            return self._wide().prepare(features, labels, ref, ref_labels, num_anchors, normalize)
        if not _dense_strides(features):
            features = features.contiguous()
        if ref is not None and not _dense_strides(ref):
            ref = ref.contiguous()
        with _device(features):
            y = labels if ref is None else torch.cat([labels, ref_labels])
            ranks = label_ranks(y)
            side = sort_side(ranks, features.shape[-1], self.dot_dtype, features.device)
            side.fill(features, ref, normalize)
            m, k = labels.shape[0], y.shape[0]
            if num_anchors == k and self.symmetric_sweep:
                anchors = side
                side.link(side)
            else:
                anchors = subset_side(side, ranks, num_anchors)
            n_same = _class_sizes_in(side.cls, anchors.cls)
            counts = Counts(n_same - 1, k - n_same, k)
            return TritonPrepared(side.x, ranks, m, num_anchors, side.inv_norm, counts, side, anchors,
                                  features.shape[-1], features, ref)

    def _wide(self):
        """Features wider than the kernels take (D > 256) run on the blockwise engine."""
        from ..blockwise import BlockwiseEngine

        return BlockwiseEngine()

    def forward(self, prep, definition, want_grad, need_ref_grad):
        if not isinstance(prep, TritonPrepared):
            return self._wide().forward(prep, definition, want_grad, need_ref_grad)
        with _device(prep.x):
            stats = self._stats(prep, definition)
            terms = definition.finalize(*_split(definition, stats), prep.counts, None)
            grad = self._grads(prep, definition, terms.params, need_ref_grad) if want_grad else None
            return _unsort(prep, terms.loss), _unsort(prep, terms.valid), stats, grad

    def backward(self, prep, definition, stats, weight, need_ref_grad):
        if not isinstance(prep, TritonPrepared):
            return self._wide().backward(prep, definition, stats, weight, need_ref_grad)
        with _device(prep.x):
            w = weight[prep.anchor_side.order]  # weights in the anchors' sorted order
            terms = definition.finalize(*_split(definition, stats), prep.counts, w)
            return self._grads(prep, definition, terms.params, need_ref_grad)

    def finish(self, prep, grad, features, ref):
        if not isinstance(prep, TritonPrepared):
            return self._wide().finish(prep, grad, features, ref)
        return grad  # the gradient kernel already wrote the features' gradients

    def _stats(self, prep, definition):
        a, c = prep.anchor_side, prep.contrast_side
        return torch.cat(merged_stats(a, c, definition, symmetric=a is c, has_self=True))

    def _grads(self, prep, definition, params, need_ref_grad):
        grad_f = torch.empty_like(prep.features)
        grad_r = torch.empty_like(prep.ref) if (prep.ref is not None and need_ref_grad) else None
        grads(prep.anchor_side, prep.contrast_side, definition, params, prep.inv_norm, prep.num_rows,
              prep.features, grad_f, grad_r, prep.d, ref=prep.ref)
        return grad_f, grad_r

    # --- block computations (the ring) -----------------------------------------------------
    def block_stats(self, anchors, contrast, self_offset, definition, dense=None):
        with _device(anchors.x):
            a, c = _block_sides(anchors, contrast, self_offset, self.dot_dtype)
            if dense is not None:
                dense = dense[:, a.order]
            d, p = merged_stats(a, c, definition, symmetric=False, has_self=self_offset is not None,
                                dense=dense, positive=dense is not None or not definition.positive_reads_dense)
            d = None if d is None else _unsort_side(a, d)
            return d, (None if p is None else _unsort_side(a, p))

    def block_grads(self, anchors, contrast, self_offset, definition, params, contrast_rows):
        with _device(anchors.x):
            a, c = _block_sides(anchors, contrast, self_offset, self.dot_dtype)
            grad_a, grad_c = grads(a, c, definition, params[:, a.order], None, 0, None, None, None,
                                   anchors.x.shape[1], partial=True)
            out_a = torch.empty_like(grad_a)
            out_a[a.order] = grad_a
            out_c = torch.empty_like(grad_c)
            out_c[c.order] = grad_c
            return out_a, (out_c[:contrast_rows] if contrast_rows else None)


def _block_sides(anchors: Rows, contrast: Rows, self_offset, dot_dtype):
    c = sort_side(contrast.ranks, contrast.x.shape[1], dot_dtype, contrast.x.device)
    c.fill_rows(contrast.x)
    a = sort_side(anchors.ranks, anchors.x.shape[1], dot_dtype, anchors.x.device)
    a.fill_rows(anchors.x)
    self_pos = None
    if self_offset is not None and c.n:  # anchor i is contrast row i + offset: its sorted position
        target = a.order + self_offset
        inside = target < c.n
        self_pos = torch.where(inside, sorted_positions(c)[target.clamp(max=c.n - 1)], -1)
    link_sides(a, c, self_pos)
    return a, c


def _dense_strides(t: torch.Tensor) -> bool:
    """Whether ``empty_like(t)`` has ``t``'s strides and the last dimension is contiguous (the
    gradient kernel reads inputs and writes gradients with one set of strides, vectorised)."""
    return t.is_contiguous() or (t.stride(-1) == 1 and torch.empty_like(t).stride() == t.stride())


def _class_sizes_in(sorted_cls: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """How many rows of ``sorted_cls`` have each ``query`` class."""
    s, q = sorted_cls.to(torch.int64), query.to(torch.int64)
    return (torch.searchsorted(s, q, right=True) - torch.searchsorted(s, q)).to(torch.float32)


def _split(definition, stats):
    nd = len(definition.dense_slots)
    return stats[:nd], stats[nd:]


def _unsort(prep, x):
    """Per-anchor values from the anchors' sorted order back to the user's anchor order."""
    return _unsort_side(prep.anchor_side, x)


def _unsort_side(side: Side, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[..., side.order] = x
    return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device(t: torch.Tensor):
    """Kernels launch on the tensors' device (and its current stream), not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else _nullcontext()

