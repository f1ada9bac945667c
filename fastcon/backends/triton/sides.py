"""The two sides of a Triton sweep (anchors and contrast rows) in the kernels' layout, and
the launch sequences of the statistics and gradient kernels.

A :class:`Side` holds rows sorted by class (stable), padded to a multiple of 16 columns in
the dot dtype, with ``order[p]`` the original index of sorted row p. ``pos_lo/pos_hi`` give
each row's class range in the other side (the positive loop's columns); ``pos`` the self
column of each row in the other side (-1: none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import launch, tiles


@dataclass
class Side:
    order: torch.Tensor  # [n] int64
    cls: torch.Tensor  # [n] int32, non-decreasing
    x: Optional[torch.Tensor] = None  # [n, DP]
    inv_norm: Optional[torch.Tensor] = None  # [n] float32
    pos: Optional[torch.Tensor] = None  # [n] int32
    pos_lo: Optional[torch.Tensor] = None
    pos_hi: Optional[torch.Tensor] = None
    dp: int = 16
    x_dtype: torch.dtype = torch.float32

    @property
    def n(self) -> int:
        return self.order.shape[0]

    def fill(self, features: torch.Tensor, ref, normalize: bool) -> None:
        """Normalise, cast, pad and sort the user's rows (one kernel, nothing else allocated)."""
        k, d = self.n, features.shape[-1]
        self.x = torch.empty(k, self.dp, dtype=self.x_dtype, device=features.device)
        self.inv_norm = torch.empty(k, dtype=torch.float32, device=features.device)
        if k == 0:
            return
        if features.dim() == 3:
            b, sb, sv, sd = features.shape[0], features.stride(0), features.stride(1), features.stride(2)
        else:
            b, sb, sv, sd = features.shape[0], features.stride(0), 0, features.stride(1)
        m = features.shape[0] * (features.shape[1] if features.dim() == 3 else 1)
        has_ref = ref is not None
        r = ref if has_ref else features
        block_r = 16 if self.dp <= 256 else 2
        tiles.prep_rows_kernel[(triton.cdiv(k, block_r),)](
            features, r, self.order, self.x, self.inv_norm, k, m, max(b, 1), d, sb, sv, sd,
            r.stride(0) if has_ref else 0, r.stride(-1) if has_ref else 0,
            NORMALIZE=bool(normalize), HAS_REF=has_ref, BLOCK_R=block_r, DP=self.dp,
            BLOCK_DP=triton.next_power_of_2(self.dp))
        if not normalize:
            self.inv_norm = None

    def fill_rows(self, rows: torch.Tensor) -> None:
        """Sort and pad rows that are already in the dot dtype (the ring's blocks)."""
        self.x = rows.new_zeros(self.n, self.dp)
        self.x[:, : rows.shape[1]] = rows[self.order]

    def link(self, other: "Side") -> None:
        """Each row's class range in ``other`` (where its positives are)."""
        mine, theirs = self.cls.to(torch.int64), other.cls.to(torch.int64)
        self.pos_lo = torch.searchsorted(theirs, mine).to(torch.int32)
        self.pos_hi = torch.searchsorted(theirs, mine, right=True).to(torch.int32)


def sort_side(ranks: torch.Tensor, d: int, dot_dtype: torch.dtype, device) -> Side:
    """A side of rows with class ids ``ranks``, sorted by class."""
    cls, order = torch.sort(ranks, stable=True)
    return Side(order, cls.to(torch.int32), dp=launch.padded_dim(d), x_dtype=dot_dtype)


def sorted_positions(side: Side) -> torch.Tensor:
    """``where[i]``: the sorted position of original row i."""
    where = torch.empty_like(side.order)
    where[side.order] = torch.arange(side.n, device=where.device)
    return where


def link_sides(anchors: Side, contrast: Side, self_pos: Optional[torch.Tensor]) -> None:
    """Positive ranges both ways, and the self columns: anchor k is contrast row ``self_pos[k]``
    (sorted positions, -1: none; None: no anchor is a contrast row)."""
    if self_pos is not None:
        anchors.pos = self_pos.to(torch.int32)
        # a scatter with a spare last slot for anchors without a contrast row (a boolean mask
        # would need the number of selected entries on the host: a GPU synchronisation)
        anchor_of = torch.full((contrast.n + 1,), -1, dtype=torch.int32, device=contrast.order.device)
        target = torch.where(self_pos >= 0, self_pos.long(), contrast.n)
        anchor_of[target] = torch.arange(anchors.n, dtype=torch.int32, device=anchor_of.device)
        contrast.pos = anchor_of[:contrast.n]
    anchors.link(contrast)
    contrast.link(anchors)


def subset_side(contrast: Side, ranks: torch.Tensor, num_anchors: int) -> Side:
    """The anchors (the first ``num_anchors`` original rows) as a side of their own; links both."""
    a_cls, a_order = torch.sort(ranks[:num_anchors], stable=True)
    pos = sorted_positions(contrast)[a_order]
    anchors = Side(a_order, a_cls.to(torch.int32), contrast.x[pos],
                   None if contrast.inv_norm is None else contrast.inv_norm[pos], dp=contrast.dp,
                   x_dtype=contrast.x_dtype)
    link_sides(anchors, contrast, pos)
    return anchors


def _stats_launch(own: Side, other: Side, definition, *, symmetric, has_self, with_dense, with_positive,
                  dense_in=None, splits=1):
    nd = len(definition.dense_slots)
    out = torch.empty(splits, nd + 2, own.n, dtype=torch.float32, device=own.x.device)
    k = definition.kernel_scalars()
    t = definition.temperature
    grid = lambda meta: (triton.cdiv(own.n, meta["BM"]), splits)  # noqa: E731
    pos = own.pos if own.pos is not None else own.cls
    launch.kernel("stats", own.dp, own.x.dtype, own.x.device, definition.name)[grid](
        own.x, other.x, own.cls, other.cls, pos, own.pos_lo, own.pos_hi,
        dense_in if dense_in is not None else out, out, own.n, other.n, splits,
        1.4426950408889634 / t, 1.0 / t, k["beta"], k["gamma"],
        WITH_DENSE=with_dense, WITH_POSITIVE=with_positive, HAS_SELF=has_self, SYMMETRIC=symmetric,
        NUM_DENSE=nd, BETA_NEG=k["beta"] < 0, DP=own.dp, size_key=launch.size_key(own.n, other.n),
        **launch.loss_flags(definition), **launch.dot_flags(own.x.dtype),
        **launch.tile_args("stats", own.dp, own.x.dtype, own.x.device, definition.name))
    return out


def merged_stats(own: Side, other: Side, definition, *, symmetric, has_self, dense=None, positive=True):
    """``(dense [nd, n] or None, positive [np, n] or None)`` of the own rows over the other
    rows (in the own side's sorted order); ``dense`` given: the positive part only."""
    nd, np_ = len(definition.dense_slots), len(definition.positive_slots)
    if own.n == 0:
        z = torch.zeros(nd + np_, 0, dtype=torch.float32, device=own.x.device)
        return (None if dense is not None else z[:nd]), (z[nd:] if positive else None)
    if other.n == 0:
        empty = definition.empty(definition.dense_slots + definition.positive_slots, own.n, torch.float32,
                                 own.x.device)
        return (None if dense is not None else empty[:nd]), (empty[nd:] if positive else None)
    common = dict(symmetric=symmetric, has_self=has_self)
    if dense is not None:
        out = _stats_launch(own, other, definition, with_dense=False, with_positive=True,
                            dense_in=dense.contiguous(), **common)
        return None, out[0, :np_]
    splits = launch.num_splits(own.n, other.n, own.x.device)
    together = positive and splits == 1
    out = _stats_launch(own, other, definition, with_dense=True, with_positive=together, splits=splits, **common)
    d = out[0, :nd]
    for s in range(1, splits):  # fixed order: deterministic
        d = definition.merge(definition.dense_slots, d, out[s, :nd])
    if not positive:
        return d, None
    if together:
        return d, out[0, nd:nd + np_]
    p = _stats_launch(own, other, definition, with_dense=False, with_positive=True, dense_in=d.contiguous(),
                      **common)
    return d, p[0, :np_]


# Largest magnitude of the weight-proportional parameters in the products' dtype: float16 G
# entries (coefficients times softmax values of order 1/N) must stay above float16's smallest
# normal number, with 32x headroom below its largest (G is at most a few coefficients).
_COEF_TARGET = {torch.float16: 2.0 ** 11}


def _weights_scaled(definition, params: torch.Tensor, dot_dtype: torch.dtype):
    """Params with the weight-proportional rows divided by their largest magnitude (times the
    dtype's target), and that scale (a device scalar: no host sync)."""
    idx = [definition.param_slots.index(n) for n in definition.weight_params]
    target = _COEF_TARGET.get(dot_dtype, 1.0)
    scale = (params[idx].abs().amax().clamp(min=1e-30) / target).to(torch.float32).reshape(1)
    out = params.to(torch.float32).clone()
    out[idx] = out[idx] / scale
    return out.contiguous(), scale


def _grad_launch(own: Side, other: Side, definition, own_prm, other_prm, scale, *, row_params, col_params,
                 symmetric, has_self, partial, out=None, extra=None, extra_idx=None, dst=None,
                 inputs=(None, None)):
    splits = launch.num_splits(own.n, other.n, own.x.device) if partial else 1
    partial_buf = torch.empty(splits, own.n, own.dp, dtype=torch.float32, device=own.x.device) if partial else None
    k = definition.kernel_scalars()
    t = definition.temperature
    out_off, ref_off, ref_out, d = dst if dst is not None else (None, None, None, own.dp)
    dummy = own.inv_norm if own.inv_norm is not None else scale
    pos = own.pos if own.pos is not None else own.cls
    grid = lambda meta: (triton.cdiv(own.n, meta["BM"]), splits)  # noqa: E731
    launch.kernel("grad", own.dp, own.x.dtype, own.x.device, definition.name)[grid](
        own.x, other.x, own.cls, other.cls, pos, own.pos_lo, own.pos_hi,
        own_prm if own_prm is not None else other_prm, other_prm if other_prm is not None else own_prm,
        own.n, other.n, splits, 1.4426950408889634 / t, 1.0 / t, k["beta"], k["gamma"],
        partial_buf if partial else dummy, dummy, out_off if out_off is not None else pos,
        ref_off if ref_off is not None else pos,
        extra if extra is not None else dummy, extra_idx if extra_idx is not None else pos, scale,
        out if out is not None else dummy, inputs[0] if inputs[0] is not None else dummy,
        ref_out if ref_out is not None else dummy, inputs[1] if inputs[1] is not None else dummy,
        ROW_PARAMS=row_params, COL_PARAMS=col_params, NUM_PARAMS=len(definition.param_slots),
        HAS_SELF=has_self, SYMMETRIC=symmetric, PARTIAL=partial, NORMALIZE=own.inv_norm is not None,
        HAS_EXTRA=extra is not None, HAS_REF_OUT=ref_out is not None, DP=own.dp, D=d,
        size_key=launch.size_key(own.n, other.n), **launch.loss_flags(definition),
        **launch.dot_flags(own.x.dtype), **launch.tile_args("grad", own.dp, own.x.dtype, own.x.device, definition.name))
    return partial_buf.sum(0) if partial else None


def grads(anchors: Side, contrast: Side, definition, params, inv_norm, m, features, grad_f, grad_r, d,
          partial=False, ref=None):
    """Feature gradients of the gradient parameters ``params`` (anchors' sorted order).

    ``partial``: return float32 ``(grad of anchors [A, DP], grad of contrast rows [K, DP])`` in
    sorted order, w.r.t. the rows as given (the ring). Otherwise write ``grad_f`` (the user's
    features' layout and dtype) and ``grad_r`` (ref rows, or None) through the normalisation's
    backward."""
    prm, scale = _weights_scaled(definition, params, contrast.x.dtype)
    symmetric = anchors is contrast
    if symmetric and not partial and launch.num_splits(contrast.n, contrast.n, contrast.x.device) == 1:
        _grad_launch(contrast, contrast, definition, prm, prm, scale, row_params=True, col_params=True,
                     symmetric=True, has_self=True, partial=False, out=grad_f,
                     dst=_destinations(contrast, m, grad_f, grad_r, d), inputs=(features, ref))
        return None
    if symmetric:
        g_c = _grad_launch(contrast, contrast, definition, prm, prm, scale, row_params=True, col_params=True,
                           symmetric=True, has_self=True, partial=True)
        g_a = g_c
    else:
        g_a = _grad_launch(anchors, contrast, definition, prm, None, scale, row_params=True, col_params=False,
                           symmetric=False, has_self=anchors.pos is not None, partial=True)
        if partial or launch.num_splits(contrast.n, anchors.n, contrast.x.device) > 1:
            g_c = _grad_launch(contrast, anchors, definition, None, prm, scale, row_params=False, col_params=True,
                               symmetric=False, has_self=contrast.pos is not None, partial=True)
            if partial:
                return g_a, g_c
            if contrast.pos is not None:
                inside = contrast.pos >= 0
                g_c[inside] += g_a[contrast.pos[inside].long()]
        else:
            _grad_launch(contrast, anchors, definition, None, prm, scale, row_params=False, col_params=True,
                         symmetric=False, has_self=contrast.pos is not None, partial=False, out=grad_f,
                         extra=g_a.contiguous(), extra_idx=contrast.pos,
                         dst=_destinations(contrast, m, grad_f, grad_r, d), inputs=(features, ref))
            return None
    if partial:
        return g_a, g_c
    _store_torch(g_c, contrast, inv_norm, m, features, ref, grad_f, grad_r, d)
    return None


def _destinations(contrast: Side, m, grad_f, grad_r, d):
    """Where each sorted contrast row's gradient goes: its element offset in ``grad_f`` (batch
    rows, view-major index ``v*B + b``), in ``grad_r`` (ref rows), -1 where not; ``grad_r``; D."""
    r = contrast.order
    if grad_f.dim() == 3:
        b = grad_f.shape[0]
        off = (r % b) * grad_f.stride(0) + (r // max(b, 1)) * grad_f.stride(1)
    else:
        off = r * grad_f.stride(0)
    out_off = torch.where(r < m, off, -1)
    ref_off = torch.where(r >= m, (r - m) * (grad_r.stride(0) if grad_r is not None else 0), -1)
    return out_off, ref_off, grad_r, d


def _store_torch(g_sorted, contrast: Side, inv_norm, m, features, ref, grad_f, grad_r, d):
    """The epilogue of :func:`grads` in PyTorch (after a split sweep)."""
    from ...inputs import flatten_rows, unflatten_rows
    from ..common import normalize_backward

    flat = torch.empty(contrast.n, d, dtype=torch.float32, device=g_sorted.device)
    flat[contrast.order] = g_sorted[:, :d]
    if inv_norm is not None:
        rows = flatten_rows(features).float()
        if ref is not None:
            rows = torch.cat([rows, ref.float()])
        inv = torch.empty_like(inv_norm)
        inv[contrast.order] = inv_norm
        flat = normalize_backward(flat, rows * inv[:, None], inv)
    grad_f.copy_(unflatten_rows(flat[:m], grad_f))
    if grad_r is not None:
        grad_r.copy_(flat[m:])
