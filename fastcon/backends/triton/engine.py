"""Triton backend (host side): the engine of :mod:`fastcon.backends.common` on the kernels.

Single-device path, a handful of launches and no PyTorch operator per row: the labels are
sorted once per side (``torch.sort``, the only PyTorch kernel of the forward pass besides the
label concatenation of a labelled memory bank); one preparation kernel per side normalises the
user's rows (float32 math), casts them to the dot dtype (the user's bfloat16 / float16, else
float32), pads D to a multiple of 16, writes them sorted by class and finds each row's class
range by binary search (:mod:`.rows`); the statistics kernel writes O(N) float32 partial
statistics per column split; one finalize kernel merges the splits and turns them into the
loss (and, for ``"mean"`` / ``"sum"``, the gradient parameters, the reduction and the scale
of the gradient); the gradient kernel applies the normalisation's backward and stores the
gradient in the user's dtype and layout (a split sweep through :func:`.rows.store_kernel`).
Every row an anchor: one gradient sweep ``(G + G^T) x / t``. Otherwise (``contrast_mode="one"``,
extra contrast rows) an anchor-side sweep (float32 partials) and a contrast-side sweep that
adds them. For float16 products the coefficients of the gradient are divided by their largest
magnitude (and multiplied back in float32 after), so large upstream weights (GradScaler)
cannot overflow a float16 ``G``. ``reduction="none"`` keeps the prepared sides for the
backward pass, which is one finalize launch and the gradient sweep.

Precision: float32 rows are multiplied exactly (no TF32). Half-precision rows use tensor
cores with float32 accumulation and float32 softmax math. float64 runs on the blockwise
engine (the registry builds it). No ``torch.unique``, no ``.item()``, no allocation whose size
depends on the data: nothing here waits for the GPU, so a forward+backward can be captured in a
CUDA graph. Kernels launch under the tensors' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..common import Engine, Rows
from . import launch
from .launch import interpreter_enabled  # noqa: F401 - the registry asks here
from .rows import MODE_REDUCED, MODE_ROWS, MODE_WEIGHTED
from .sides import (Side, feature_grads, finalize, link_sides, merged_stats, partial_grads, prepare_sides,
                    sort_side, sorted_positions, stats_partials)

__all__ = ["TritonEngine", "interpreter_enabled"]


@dataclass
class TritonPrepared:
    """A single-device problem in the kernels' layout: the contrast rows and the anchors as
    :class:`~.sides.Side` (the same object when every row is an anchor)."""

    contrast: Side
    anchors: Side
    num_rows: int  # M, batch rows
    num_contrast: int  # K
    d: int
    features: torch.Tensor
    ref: Optional[torch.Tensor]


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
        k = labels.shape[0] + (0 if ref is None else ref.shape[0])
        with _device(features):
            contrast, anchors = prepare_sides(features, labels, ref, ref_labels, num_anchors, normalize,
                                              self.dot_dtype, num_anchors == k and self.symmetric_sweep)
        if not normalize:
            contrast.inv_norm = anchors.inv_norm = None
        return TritonPrepared(contrast, anchors, labels.shape[0], k, features.shape[-1], features, ref)

    def _wide(self):
        """Features wider than the kernels take (D > 256) run on the blockwise engine."""
        from ..blockwise import BlockwiseEngine

        return BlockwiseEngine()

    def stats_rows(self, definition) -> int:
        return len(definition.dense_slots) + 2

    def reduced(self, prep, definition, mean, need_f, need_r):
        if not isinstance(prep, TritonPrepared):
            return self._wide().reduced(prep, definition, mean, need_f, need_r)
        want = need_f or need_r
        device = prep.features.device
        total = torch.empty((), dtype=torch.float32, device=device)
        n_valid = torch.empty((), dtype=torch.int64, device=device)
        a = prep.anchors
        if a.n == 0:
            return total.zero_(), n_valid.zero_(), *self._zero_grads(prep, need_f, need_r)
        with _device(prep.features):
            part, splits = stats_partials(a, prep.contrast, definition, prep.num_contrast)
            params, scale = finalize(part, splits, a, definition, MODE_REDUCED, num_contrast=prep.num_contrast,
                                     mean=mean, with_params=want, total=total, n_valid=n_valid)
            grad_f = grad_r = None
            if want:
                grad_f, grad_r = self._grads(prep, definition, params, scale, need_r)
        return total, n_valid, (grad_f if need_f else None), grad_r

    def rows(self, prep, definition):
        if not isinstance(prep, TritonPrepared):  # the blockwise engine's statistics, in this engine's rows
            loss, valid, stats = self._wide().rows(prep, definition)
            pad = stats.new_zeros(self.stats_rows(definition) - stats.shape[0], stats.shape[1])
            return loss, valid, torch.cat([stats, pad])
        a = prep.anchors
        device = prep.features.device
        loss = torch.empty(a.n, dtype=torch.float32, device=device)  # every entry written by finalize
        valid = torch.empty(a.n, dtype=torch.uint8, device=device)
        stats = torch.empty(self.stats_rows(definition), a.n, dtype=torch.float32, device=device)
        if a.n:
            with _device(prep.features):
                part, splits = stats_partials(a, prep.contrast, definition, prep.num_contrast)
                finalize(part, splits, a, definition, MODE_ROWS, num_contrast=prep.num_contrast, stats=stats,
                         loss=loss, valid=valid)
        return loss, valid.view(torch.bool), stats

    def rows_backward(self, prep, definition, stats, grad_rows, need_f, need_r):
        if not isinstance(prep, TritonPrepared):
            used = len(definition.dense_slots) + len(definition.positive_slots)
            return self._wide().rows_backward(prep, definition, stats[:used], grad_rows, need_f, need_r)
        if prep.anchors.n == 0:
            return self._zero_grads(prep, need_f, need_r)
        with _device(prep.features):
            params, scale = finalize(stats, 1, prep.anchors, definition, MODE_WEIGHTED,
                                     num_contrast=prep.num_contrast, with_params=True,
                                     grad_rows=grad_rows.contiguous())
            grad_f, grad_r = self._grads(prep, definition, params, scale, need_r)
        return (grad_f if need_f else None), grad_r

    def _grads(self, prep, definition, params, scale, need_r):
        grad_f = torch.empty_like(prep.features)
        grad_r = torch.empty_like(prep.ref) if (prep.ref is not None and need_r) else None
        feature_grads(prep.anchors, prep.contrast, definition, params, scale, prep.features, prep.ref, grad_f,
                      grad_r, prep.d)
        return grad_f, grad_r

    @staticmethod
    def _zero_grads(prep, need_f, need_r):
        grad_r = torch.zeros_like(prep.ref) if (prep.ref is not None and need_r) else None
        return (torch.zeros_like(prep.features) if need_f else None), grad_r

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
            grad_a, grad_c = partial_grads(a, c, definition, params[:, a.order])
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

