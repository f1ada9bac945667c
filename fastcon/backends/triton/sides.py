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

from ...losses.base import SUM
from ..common import joined_labels
from . import launch, rows, tiles


@dataclass
class Side:
    order: torch.Tensor  # [n] int64 (single device: [labelled rows]; the unlabelled rows stay in place, last)
    cls: torch.Tensor  # [n] int32, non-decreasing
    x: Optional[torch.Tensor] = None  # [n, DP]
    inv_norm: Optional[torch.Tensor] = None  # [n] float32
    pos: Optional[torch.Tensor] = None  # [n] int32
    pos_lo: Optional[torch.Tensor] = None
    pos_hi: Optional[torch.Tensor] = None
    dp: int = 16
    x_dtype: torch.dtype = torch.float32
    out_off: Optional[torch.Tensor] = None  # [n] int64: element offset of the row's gradient in the features, -1
    ref_off: Optional[torch.Tensor] = None  # [n] int64: ... in the ref rows, -1

    @property
    def n(self) -> int:
        return self.cls.shape[0]

    def fill_rows(self, rows: torch.Tensor) -> None:
        """Sort and pad rows that are already in the dot dtype (the ring's blocks)."""
        self.x = rows.new_zeros(self.n, self.dp)
        self.x[:, : rows.shape[1]] = rows[self.order]

    def link(self, other: "Side") -> None:
        """Each row's class range in ``other`` (where its positives are)."""
        mine, theirs = self.cls.to(torch.int64), other.cls.to(torch.int64)
        self.pos_lo = torch.searchsorted(theirs, mine).to(torch.int32)
        self.pos_hi = torch.searchsorted(theirs, mine, right=True).to(torch.int32)


def _empty_side(n: int, dp: int, dot_dtype: torch.dtype, device, order, with_pos: bool, offsets: bool) -> Side:
    i32 = dict(dtype=torch.int32, device=device)
    return Side(order, torch.empty(n, **i32), torch.empty(n, dp, dtype=dot_dtype, device=device),
                torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, **i32) if with_pos else None,
                torch.empty(n, **i32), torch.empty(n, **i32), dp, dot_dtype,
                torch.empty(n, dtype=torch.int64, device=device) if offsets else None,
                torch.empty(n, dtype=torch.int64, device=device) if offsets else None)


def _prep_launch(side: Side, features, ref, y_sorted, n_labelled, cls_y, n_cls, range_y, n_range, normalize,
                 where=None, self_where=None, other: Optional[Side] = None, init_pos=False):
    k = side.n
    if k == 0:
        return
    if features.dim() == 3:
        b, sb, sv, sd = features.shape[0], features.stride(0), features.stride(1), features.stride(2)
    else:
        b, sb, sv, sd = features.shape[0], features.stride(0), 0, features.stride(1)
    m = features.shape[0] * (features.shape[1] if features.dim() == 3 else 1)
    has_ref = ref is not None
    r = ref if has_ref else features
    block_r = launch.PREP_BLOCK_R
    offsets = side.out_off is not None
    dummy = side.cls
    steps = max(n_cls, n_range, 1).bit_length() + 1
    rows.prep_side_kernel[(triton.cdiv(k, block_r),)](
        features, r, side.order, y_sorted, n_labelled, cls_y, n_cls, range_y, n_range, steps,
        side.x, side.inv_norm, side.cls, side.pos_lo, side.pos_hi,
        where if where is not None else dummy, self_where if self_where is not None else dummy,
        side.pos if side.pos is not None else dummy, other.pos if other is not None else dummy,
        side.out_off if offsets else dummy, side.ref_off if offsets else dummy,
        k, m, max(b, 1), features.shape[-1], sb, sv, sd,
        r.stride(0) if has_ref else 0, r.stride(-1) if has_ref else 0,
        NORMALIZE=bool(normalize), HAS_REF=has_ref, WRITE_WHERE=where is not None, INIT_POS=init_pos,
        SELF_FROM=self_where is not None, OFFSETS=offsets, BLOCK_R=block_r, DP=side.dp,
        BLOCK_DP=triton.next_power_of_2(side.dp), num_warps=launch.PREP_WARPS)


def prepare_sides(features, labels, ref, ref_labels, num_anchors: int, normalize: bool, dot_dtype, symmetric: bool):
    """``(contrast side, anchor side)`` of a single-device problem: one sort of the labels per
    side and one preparation kernel per side (the anchor side is the contrast side when
    ``symmetric``: every row an anchor, one gradient sweep)."""
    device = features.device
    m = labels.shape[0]
    k = m + (0 if ref is None else ref.shape[0])
    y = joined_labels(labels, ref_labels)
    kl = y.shape[0]  # labelled contrast rows; the unlabelled ref rows follow them, unsorted
    y_sorted, order = torch.sort(y, stable=True)
    dp = launch.padded_dim(features.shape[-1])
    contrast = _empty_side(k, dp, dot_dtype, device, order, not symmetric, True)
    if symmetric:
        _prep_launch(contrast, features, ref, y_sorted, kl, y_sorted, kl, y_sorted, kl, normalize)
        return contrast, contrast
    a_sorted, a_order = torch.sort(labels[:num_anchors], stable=True)
    anchors = _empty_side(num_anchors, dp, dot_dtype, device, a_order, True, False)
    where = torch.empty(k, dtype=torch.int32, device=device)
    _prep_launch(contrast, features, ref, y_sorted, kl, y_sorted, kl, a_sorted, num_anchors, normalize,
                 where=where, init_pos=True)
    _prep_launch(anchors, features, None, a_sorted, num_anchors, y_sorted, kl, y_sorted, kl, normalize,
                 self_where=where, other=contrast)
    return contrast, anchors


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


def _stats_launch(own: Side, other: Side, definition, *, symmetric, has_self, with_dense, with_positive,
                  dense_in=None, splits=1, out=None, dense_splits=1):
    nd = len(definition.dense_slots)
    if out is None:
        out = torch.empty(splits, nd + 2, own.n, dtype=torch.float32, device=own.x.device)
    k = definition.kernel_scalars()
    t = definition.temperature
    grid = lambda meta: (triton.cdiv(own.n, meta["BM"]), splits)  # noqa: E731
    pos = own.pos if own.pos is not None else own.cls
    # a positive-only launch (one split) takes num_splits as the number of dense_in's splits
    launch.kernel("stats", own.dp, own.x.dtype, own.x.device, definition.name)[grid](
        own.x, other.x, own.cls, other.cls, pos, own.pos_lo, own.pos_hi,
        dense_in if dense_in is not None else out, out, own.n, other.n, splits if with_dense else dense_splits,
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


def _weights_scaled(definition, params: torch.Tensor, dot_dtype: torch.dtype):
    """The ring's parameters with the weight-proportional rows (one contiguous range of slots)
    divided by their largest magnitude (times the dtype's target, :data:`_COEF_TARGET`), and
    that scale (a device scalar: no host sync, no index tensor)."""
    idx = [definition.param_slots.index(n) for n in definition.weight_params]
    lo, hi = min(idx), max(idx) + 1
    assert hi - lo == len(idx), "a definition's weight parameters must be consecutive slots"
    target = _COEF_TARGET.get(dot_dtype, 1.0)
    scale = (params[lo:hi].abs().amax().clamp(min=1e-30) / target).to(torch.float32).reshape(1)
    out = params.to(torch.float32).clone()
    out[lo:hi] /= scale
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
    return partial_buf


def partial_grads(anchors: Side, contrast: Side, definition, params):
    """The ring's block gradients: float32 ``(grad of anchors [A, DP], grad of contrast rows
    [K, DP])`` in sorted order, w.r.t. the rows as given, for the gradient parameters
    ``params`` (anchors' sorted order)."""
    prm, scale = _weights_scaled(definition, params, contrast.x.dtype)
    g_a = _grad_launch(anchors, contrast, definition, prm, None, scale, row_params=True, col_params=False,
                       symmetric=False, has_self=anchors.pos is not None, partial=True).sum(0)
    g_c = _grad_launch(contrast, anchors, definition, None, prm, scale, row_params=False, col_params=True,
                       symmetric=False, has_self=contrast.pos is not None, partial=True).sum(0)
    return g_a, g_c


def stats_partials(anchors: Side, contrast: Side, definition, num_contrast: int):
    """``(part [splits, NUM_DENSE + 2, A], splits)``: the anchors' statistics over the contrast
    rows, each split's dense slots and split 0's positive slots (what :func:`finalize` merges).
    One launch, or, when the positive part reads the finished dense part and the columns are
    split, a launch for the dense part and a positive-only launch that merges what it reads."""
    symmetric = anchors is contrast
    splits = launch.num_splits(anchors.n, contrast.n, contrast.x.device)
    common = dict(symmetric=symmetric, has_self=True)
    if not definition.positive_reads_dense or splits == 1:
        part = _stats_launch(anchors, contrast, definition, with_dense=True, with_positive=True, splits=splits,
                             **common)
        return part, splits
    part = _stats_launch(anchors, contrast, definition, with_dense=True, with_positive=False, splits=splits, **common)
    nd = len(definition.dense_slots)
    _stats_launch(anchors, contrast, definition, with_dense=False, with_positive=True, dense_in=part,
                  dense_splits=splits, out=part[0, nd:], **common)
    return part, splits


# float16 G entries (coefficients times softmax values of order 1/N) must stay above float16's
# smallest normal number, with 32x headroom below its largest (G is at most a few coefficients):
# the weight-proportional parameters are divided by their largest magnitude over this target.
# bfloat16 and float32 have float32's range: their coefficients are not rescaled.
_COEF_TARGET = {torch.float16: 2.0 ** 11}
_FINALIZE_BLOCK = 2048


def finalize(part, splits, anchors: Side, definition, mode, *, num_contrast, mean=False, with_params=False,
             grad_rows=None, stats=None, loss=None, valid=None, total=None, n_valid=None):
    """One launch of :func:`.rows.finalize_kernel`; returns ``(params, scale)`` (None without
    ``with_params``). The outputs the mode writes are given."""
    n = anchors.n
    device = part.device
    params = torch.empty(len(definition.param_slots), n, dtype=torch.float32, device=device) if with_params else None
    scale = torch.empty(1, dtype=torch.float32, device=device) if with_params else None
    k = definition.kernel_scalars()
    target = _COEF_TARGET.get(anchors.x_dtype)
    dense_sums = sum(1 << i for i, (_, rule) in enumerate(definition.dense_slots) if rule == SUM)
    weights = sum(1 << definition.param_slots.index(name) for name in definition.weight_params)

    def given(t):
        return part if t is None else t

    rows.finalize_kernel[(1,)](
        part, splits, n, anchors.pos_lo, anchors.pos_hi, num_contrast, given(grad_rows), anchors.order, given(stats),
        given(params), given(scale), given(loss), given(valid), given(total), given(n_valid),
        k["scale"], k["beta"], target or 1.0,
        LOSS=definition.kernel_id, MODE=mode, MEAN=bool(mean), WITH_PARAMS=with_params,
        NUM_DENSE=len(definition.dense_slots), NUM_POSITIVE=len(definition.positive_slots), DENSE_SUMS=dense_sums,
        NUM_PARAMS=len(definition.param_slots), WEIGHT_PARAMS=weights, SCALE_COEFS=target is not None,
        BETA_ZERO=k["beta"] == 0.0, BLOCK=_FINALIZE_BLOCK, num_warps=8)
    return params, scale


def _store_launch(part, splits, side: Side, grad_f, grad_r, d, features, ref, extra=None, extra_splits=0,
                  n_extra=0, extra_idx=None):
    bm = 16
    dummy = side.cls
    rows.store_kernel[(triton.cdiv(side.n, bm),)](
        part, splits, side.n, extra if extra is not None else part, extra_splits, n_extra,
        extra_idx if extra_idx is not None else dummy, side.inv_norm if side.inv_norm is not None else part,
        side.out_off, side.ref_off, grad_f, features, grad_r if grad_r is not None else grad_f,
        ref if ref is not None else features,
        NORMALIZE=side.inv_norm is not None, HAS_EXTRA=extra is not None, HAS_REF_OUT=grad_r is not None,
        DP=side.dp, D=d, BM=bm)


def feature_grads(anchors: Side, contrast: Side, definition, params, scale, features, ref, grad_f, grad_r, d):
    """Write the gradients of the features (``grad_f``, the features' layout and dtype) and of
    the ref rows (``grad_r``, or None) for the gradient parameters ``params`` (anchors' sorted
    order) times ``scale``. Every row an anchor: one sweep ``(G + G^T) x / t``; otherwise an
    anchor-side sweep (float32 partials) whose rows the contrast-side sweep adds. A split sweep
    ends in :func:`.rows.store_kernel`."""
    dst = (contrast.out_off, contrast.ref_off, grad_r, d)
    io = dict(features=features, ref=ref, grad_f=grad_f, grad_r=grad_r, d=d)
    if anchors is contrast:
        splits = launch.num_splits(contrast.n, contrast.n, contrast.x.device)
        part = _grad_launch(contrast, contrast, definition, params, params, scale, row_params=True, col_params=True,
                            symmetric=True, has_self=True, partial=splits > 1, out=grad_f, dst=dst,
                            inputs=(features, ref))
        if splits > 1:
            _store_launch(part, splits, contrast, **io)
        return
    splits_a = launch.num_splits(anchors.n, contrast.n, contrast.x.device)
    g_a = _grad_launch(anchors, contrast, definition, params, None, scale, row_params=True, col_params=False,
                       symmetric=False, has_self=True, partial=True)
    splits_c = launch.num_splits(contrast.n, anchors.n, contrast.x.device)
    one = splits_a == 1 and splits_c == 1
    part = _grad_launch(contrast, anchors, definition, None, params, scale, row_params=False, col_params=True,
                        symmetric=False, has_self=True, partial=not one, out=grad_f, extra=g_a[0] if one else None,
                        extra_idx=contrast.pos, dst=dst, inputs=(features, ref))
    if not one:
        _store_launch(part, splits_c, contrast, extra=g_a, extra_splits=splits_a, n_extra=anchors.n,
                      extra_idx=contrast.pos, **io)
