"""The pieces the Triton kernels share: loading and multiplying one tile, the ranges of plain
and special tiles, loading the gradient parameters and storing the rows' gradients.
(The loops are in :mod:`.kernels`, the per-loss math in :mod:`.tile_math`.)"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_t(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``a @ b^T`` with float32 accumulation. ``UPCAST_DOT`` (CPU interpreter only) multiplies
    half-precision operands in float32, since the interpreter's half ``tl.dot`` is not exact."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)


@triton.jit
def tile_qk(own, other_ptr, cols, col_ok, DP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        MASK_LOAD: tl.constexpr):
    """One tile of raw dot products ``own [BM, DP] . other[cols]^T`` and the other rows."""
    d = tl.arange(0, DP)
    ptrs = other_ptr + cols.to(tl.int64)[:, None] * DP + d[None, :]
    if MASK_LOAD:
        other = tl.load(ptrs, mask=col_ok[:, None], other=0.0)
    else:
        other = tl.load(ptrs)
    return dot_t(own, other, DOT_PRECISION, UPCAST_DOT), other


@triton.jit
def own_tile(own_ptr, own_cls_ptr, own_pos_ptr, n_own, BM: tl.constexpr, DP: tl.constexpr,
             HAS_SELF: tl.constexpr, SYMMETRIC: tl.constexpr):
    """This program's ``BM`` own rows: first row, indices, in-range mask, the tile ``[BM, DP]``
    (loaded once and kept), classes and self columns (``r`` when ``SYMMETRIC``; ``own_pos``
    with ``HAS_SELF``, where -1 is none; otherwise none)."""
    row0 = tl.program_id(0) * BM
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < n_own
    d = tl.arange(0, DP)
    own = tl.load(own_ptr + rows.to(tl.int64)[:, None] * DP + d[None, :], mask=row_ok[:, None], other=0.0)
    cls_r = tl.load(own_cls_ptr + rows, mask=row_ok, other=-1)
    if SYMMETRIC:
        self_col = rows
    elif HAS_SELF:
        self_col = tl.load(own_pos_ptr + rows, mask=row_ok, other=-1)
    else:
        self_col = rows * 0 - 1
    return row0, rows, row_ok, own, cls_r, self_col


@triton.jit
def class_range(pos_lo_ptr, pos_hi_ptr, row0, n_own, BM: tl.constexpr):
    """Columns ``[lo, hi)`` of the classes of this block's rows (the rows are sorted by class)."""
    return tl.load(pos_lo_ptr + row0), tl.load(pos_hi_ptr + tl.minimum(row0 + BM, n_own) - 1)


@triton.jit
def special_band(self_col, pos_lo_ptr, pos_hi_ptr, row0, n_own, BM: tl.constexpr, BN: tl.constexpr,
                 HAS_SELF: tl.constexpr, SYMMETRIC: tl.constexpr, CLASS_BAND: tl.constexpr):
    """Tiles ``[lo, hi)`` the plain loop leaves to the masked loop: those that may hold a
    self column of this block's rows or, with ``CLASS_BAND``, a column of their classes (a
    superset: a row's self column has its class), so that plain tiles need no class test."""
    if CLASS_BAND:
        lo, hi = class_range(pos_lo_ptr, pos_hi_ptr, row0, n_own, BM)
        return tl.where(hi > lo, lo // BN, 0), tl.where(hi > lo, tl.cdiv(hi, BN), 0)
    if not HAS_SELF:
        return 0, 0
    if SYMMETRIC:
        return row0 // BN, (tl.minimum(row0 + BM, n_own) - 1) // BN + 1
    lo = tl.min(tl.where(self_col >= 0, self_col, 2147483647), 0)
    hi = tl.max(self_col, 0)
    return tl.where(hi >= 0, lo // BN, 0), tl.where(hi >= 0, hi // BN + 1, 0)


@triton.jit
def tile_ranges(n_other, split, num_splits, band_lo, band_hi, BN: tl.constexpr):
    """This split's plain tiles (count, first, band start and width inside them) and its
    special tiles (count, band start, number of band tiles, the tail tile or -1)."""
    n_tiles = tl.cdiv(n_other, BN)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    full = n_other // BN
    s0 = split * tiles_per_split
    s1 = tl.minimum(s0 + tiles_per_split, n_tiles)
    e = tl.minimum(s1, full)
    blo = tl.minimum(tl.maximum(band_lo, s0), tl.maximum(e, s0))
    bhi = tl.minimum(tl.maximum(band_hi, s0), tl.maximum(e, s0))
    n_plain = tl.maximum(e - s0, 0) - (bhi - blo)
    slo = tl.minimum(tl.maximum(band_lo, s0), s1)
    shi = tl.minimum(tl.maximum(band_hi, s0), s1)
    tail = tl.where((full < n_tiles) & (full >= s0) & (full < s1) & ((full < slo) | (full >= shi)), full, -1)
    n_special = (shi - slo) + tl.where(tail >= 0, 1, 0)
    return n_plain, s0, blo, bhi - blo, n_special, slo, shi - slo, tail


@triton.jit
def load_params(prm_ptr, idx, ok, n, NUM_PARAMS: tl.constexpr):
    """The gradient parameters ``prm [NUM_PARAMS, n]`` of rows ``idx`` (0 beyond ``NUM_PARAMS``)."""
    q0 = tl.load(prm_ptr + idx, mask=ok, other=0.0)
    q1 = tl.load(prm_ptr + n + idx, mask=ok, other=0.0)
    q2 = tl.load(prm_ptr + 2 * n + idx, mask=ok, other=0.0)
    q3 = q2 * 0.0
    if NUM_PARAMS > 3:
        q3 = tl.load(prm_ptr + 3 * n + idx, mask=ok, other=0.0)
    return q0, q1, q2, q3


@triton.jit
def raw_rows(feat_ptr, ref_ptr, at, ref_at, in_batch, in_ref, HAS_REF_OUT: tl.constexpr):
    """The user's raw rows (batch rows, or ref rows), float32."""
    x = tl.load(feat_ptr + at, mask=in_batch, other=0.0).to(tl.float32)
    if HAS_REF_OUT:
        x += tl.load(ref_ptr + ref_at, mask=in_ref, other=0.0).to(tl.float32)
    return x


@triton.jit
def acc_dot(g, other, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + G @ other`` with ``G`` rounded to the rows' dtype, as the tensor cores see it
    (the interpreter rounds it too, then multiplies in float32)."""
    if UPCAST_DOT:
        return tl.dot(g.to(other.dtype).to(tl.float32), other.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(g.to(other.dtype), other, acc, input_precision=DOT_PRECISION)


@triton.jit
def store_rows(g, rows, row_ok, inv_norm_ptr, out_off_ptr, ref_off_ptr, out_ptr, feat_ptr, ref_out_ptr, ref_ptr,
               NORMALIZE: tl.constexpr, HAS_REF_OUT: tl.constexpr, DP: tl.constexpr, D: tl.constexpr):
    """Store the gradients ``g [BM, DP]`` (float32, w.r.t. the normalised rows) of sorted rows
    ``rows`` in the user's tensors: the normalisation's backward (with the row re-read from the
    user's tensor and normalised in float32), then the output dtype at the row's place: element
    offset ``out_off`` in the features (or ``ref_off`` in the ref rows; -1: not there). Outputs
    have the strides of the inputs, whose last dimension is contiguous (vectorised stores)."""
    d = tl.arange(0, DP)
    d_ok = (d < D)[None, :]
    off = tl.load(out_off_ptr + rows, mask=row_ok, other=-1)
    at = off[:, None] + d[None, :]
    in_batch = (off >= 0)[:, None] & d_ok
    ref_at, in_ref = at, in_batch
    if HAS_REF_OUT:
        ref_off = tl.load(ref_off_ptr + rows, mask=row_ok, other=-1)
        ref_at = ref_off[:, None] + d[None, :]
        in_ref = (ref_off >= 0)[:, None] & d_ok
    if NORMALIZE:
        # the raw row is read twice (it stays in the cache) so that it is never held
        # beside the accumulator for long: d raw = (g - (g . z) z) / |x| with z = x / |x|
        inv = tl.load(inv_norm_ptr + rows, mask=row_ok, other=0.0)
        radial = tl.sum(g * raw_rows(feat_ptr, ref_ptr, at, ref_at, in_batch, in_ref, HAS_REF_OUT), 1)
        radial = radial * inv * inv * inv  # (g . x) / |x|^3
        g = g * inv[:, None] - radial[:, None] * raw_rows(feat_ptr, ref_ptr, at, ref_at, in_batch, in_ref,
                                                           HAS_REF_OUT)
    tl.store(out_ptr + at, g.to(out_ptr.dtype.element_ty), mask=in_batch)
    if HAS_REF_OUT:
        tl.store(ref_out_ptr + ref_at, g.to(ref_out_ptr.dtype.element_ty), mask=in_ref)
