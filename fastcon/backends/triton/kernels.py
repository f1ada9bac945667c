"""Triton kernels of fastcon: the generic loops; the per-loss math is in :mod:`.tile_math`.

Layout (prepared by :mod:`.engine`): the contrast rows are normalised, cast to the dot
dtype, padded with zeros to ``DP`` (a multiple of 16) and **sorted by class**, so the
positives of a block of rows are one contiguous column range. A program owns ``BM`` rows
("own" rows: anchors, or contrast columns in the contrast-side backward) and sweeps the
"other" rows in ``BN`` tiles:

- the **plain loop** runs over every tile that holds neither an own row's self column nor
  the partial last tile (nor, for SCHaNe, whose sums run over negatives only, a column of
  the block's classes): no mask, one ``tl.dot`` per tile, so the compiler pipelines it;
- the **special loop** runs over the others (the band that can hold self columns, or
  SCHaNe's class range, and the tail) with masks;
- the **positive loop** runs over the block's class range ``[pos_lo, pos_hi)`` only.

A second grid axis splits the plain/special range of columns (``num_splits``) when
own blocks are few; the splits are merged in a fixed order (:mod:`.rows`). No atomics: every output
element is written by one program, so results are bitwise reproducible.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tile_math as tm
from .tiles import acc_dot, class_range, load_params, own_tile, special_band, store_rows, tile_qk, tile_ranges


@triton.jit
def stats_kernel(own_ptr, other_ptr, own_cls_ptr, other_cls_ptr, own_pos_ptr, pos_lo_ptr, pos_hi_ptr,
                 dense_in_ptr, out_ptr, n_own, n_other, num_splits, c1, inv_t, beta, gamma,
                 LOSS: tl.constexpr, WITH_DENSE: tl.constexpr, WITH_POSITIVE: tl.constexpr,
                 HAS_SELF: tl.constexpr, SYMMETRIC: tl.constexpr, NUM_DENSE: tl.constexpr,
                 BETA_ZERO: tl.constexpr, BETA_ONE: tl.constexpr, BETA_NEG: tl.constexpr,
                 GAMMA_ZERO: tl.constexpr, GAMMA_ONE: tl.constexpr, DP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 size_key=0):
    """Row statistics of ``BM`` own rows over the other rows (forward pass).

    Grid ``(cdiv(n_own, BM), splits)``; the own tile ``[BM, DP]`` is loaded once and kept,
    each other tile ``[BN, DP]`` is loaded once per iteration. Writes float32
    ``out [splits, NUM_DENSE + 2, n_own]``: each split's dense slots (``WITH_DENSE``), then,
    in split 0 only, the positive slots (``WITH_POSITIVE``; a positive-only launch, grid
    ``(cdiv(n_own, BM), 1)``, reads dense slot 0, a log-sum-exp, from the ``num_splits`` splits
    of ``dense_in [num_splits, NUM_DENSE + 2, n_own]`` and merges them). Own row r's self column is ``own_pos[r]`` (``r`` when
    ``SYMMETRIC``; none without ``HAS_SELF`` or where -1). ``size_key`` only keys the autotuner.
    """
    split = tl.program_id(1)
    row0, rows, row_ok, own, cls_r, self_col = own_tile(own_ptr, own_cls_ptr, own_pos_ptr, n_own, BM, DP,
                                                        HAS_SELF, SYMMETRIC)
    ninf = tl.full((BM,), float("-inf"), tl.float32)
    zero = tl.zeros((BM,), tl.float32)
    r0, r1, r2, r3 = ninf, zero, zero, tl.full((BM,), float("inf"), tl.float32)
    n_slots = 0
    if WITH_DENSE:
        band_lo, band_hi = special_band(self_col, pos_lo_ptr, pos_hi_ptr, row0, n_own, BM, BN, HAS_SELF,
                                        SYMMETRIC, LOSS == tm.SCHANE)
        n_plain, s0, blo, bw, n_special, slo, sw, tail = tile_ranges(n_other, split, num_splits, band_lo,
                                                                      band_hi, BN)
        for t in range(0, n_plain):  # every column is in A(i), and (SCHaNe) in N(i)
            tile = s0 + t + tl.where(s0 + t >= blo, bw, 0)
            cols = tile * BN + tl.arange(0, BN)
            qk, _ = tile_qk(own, other_ptr, cols, cols < n_other, DP, DOT_PRECISION, UPCAST_DOT, False)
            r0, r1, r2, r3 = tm.dense_update(qk, qk, qk, c1, beta, r0, r1, r2, r3, LOSS, False,
                                             BETA_ZERO, BETA_ONE, BETA_NEG)
        for t in range(0, n_special):
            tile = tl.where(t < sw, slo + t, tail)
            cols = tile * BN + tl.arange(0, BN)
            col_ok = cols < n_other
            qk, _ = tile_qk(own, other_ptr, cols, col_ok, DP, DOT_PRECISION, UPCAST_DOT, True)
            keep = col_ok[None, :] & (cols[None, :] != self_col[:, None])
            cls_c = tl.load(other_cls_ptr + cols, mask=col_ok, other=-1)
            neg = keep & (cls_r[:, None] != cls_c[None, :])
            r0, r1, r2, r3 = tm.dense_update(qk, keep, neg, c1, beta, r0, r1, r2, r3, LOSS, True,
                                             BETA_ZERO, BETA_ONE, BETA_NEG)
        d0, d1 = tm.dense_finish(r0, r1, r2, r3, c1, beta, LOSS)
        base = out_ptr + split * (NUM_DENSE + 2) * n_own
        tl.store(base + rows, d0, mask=row_ok)
        if NUM_DENSE == 2:
            tl.store(base + n_own + rows, d1, mask=row_ok)
        n_slots = NUM_DENSE
    else:  # dense slot 0 of dense_in [num_splits, NUM_DENSE + 2, n_own], merged (a log-sum-exp)
        d0 = tl.load(dense_in_ptr + rows, mask=row_ok, other=0.0)
        for s in range(1, num_splits):
            e = tl.load(dense_in_ptr + s * (NUM_DENSE + 2) * n_own + rows, mask=row_ok, other=0.0)
            d0 = tm.logaddexp(d0, e)
    if WITH_POSITIVE:
        if split == 0:  # the class range is not split: split 0 takes all of it
            lse = tl.where(d0 == float("-inf"), 0.0, d0)[:, None]
            lo, hi = class_range(pos_lo_ptr, pos_hi_ptr, row0, n_own, BM)
            p0, p1, p2 = zero, zero, zero
            if LOSS == tm.SCHANE:
                p0 = ninf
            for c0 in range(lo, hi, BN):
                cols = c0 + tl.arange(0, BN)
                col_ok = cols < hi
                qk, _ = tile_qk(own, other_ptr, cols, col_ok, DP, DOT_PRECISION, UPCAST_DOT, True)
                cls_c = tl.load(other_cls_ptr + cols, mask=col_ok, other=-1)
                pos = col_ok[None, :] & (cls_r[:, None] == cls_c[None, :]) & (cols[None, :] != self_col[:, None])
                p0, p1, p2 = tm.positive_update(qk, pos, inv_t, c1, lse, gamma, p0, p1, p2, LOSS, GAMMA_ZERO,
                                                GAMMA_ONE)
            q0, q1 = tm.positive_finish(p0, p1, inv_t, c1, LOSS)
            base = out_ptr + (split * (NUM_DENSE + 2) + n_slots) * n_own
            tl.store(base + rows, q0, mask=row_ok)
            if LOSS == tm.FOCAL:
                tl.store(base + n_own + rows, q1, mask=row_ok)


@triton.jit
def _tile_grad(qk, c1, inv_t, beta, gamma, rq0, rq1, rq2, rq3, cols, col_ok, other_prm_ptr, n_other,
               POSITIVE: tl.constexpr, LOSS: tl.constexpr, ROW_PARAMS: tl.constexpr, COL_PARAMS: tl.constexpr,
               NUM_PARAMS: tl.constexpr, BETA_ZERO: tl.constexpr, BETA_ONE: tl.constexpr,
               GAMMA_ZERO: tl.constexpr, GAMMA_ONE: tl.constexpr):
    """``G`` of one tile before masks: rows' parameters give ``G_ij``, columns' give ``G_ji``."""
    g = qk * 0.0
    if ROW_PARAMS:
        if POSITIVE:
            g = tm.positive_grad(qk, inv_t, c1, gamma, rq0[:, None], rq1[:, None], rq2[:, None], rq3[:, None],
                                 LOSS, GAMMA_ZERO, GAMMA_ONE)
        else:
            g = tm.dense_grad(qk, c1, beta, rq0[:, None], rq1[:, None], rq2[:, None], rq3[:, None], LOSS,
                              BETA_ZERO, BETA_ONE)
    if COL_PARAMS:
        q0, q1, q2, q3 = load_params(other_prm_ptr, cols, col_ok, n_other, NUM_PARAMS)
        if POSITIVE:
            g += tm.positive_grad(qk, inv_t, c1, gamma, q0[None, :], q1[None, :], q2[None, :], q3[None, :], LOSS,
                                  GAMMA_ZERO, GAMMA_ONE)
        else:
            g += tm.dense_grad(qk, c1, beta, q0[None, :], q1[None, :], q2[None, :], q3[None, :], LOSS,
                               BETA_ZERO, BETA_ONE)
    return g


@triton.jit
def grad_kernel(own_ptr, other_ptr, own_cls_ptr, other_cls_ptr, own_pos_ptr, pos_lo_ptr, pos_hi_ptr,
                own_prm_ptr, other_prm_ptr, n_own, n_other, num_splits, c1, inv_t, beta, gamma,
                partial_ptr, inv_norm_ptr, out_off_ptr, ref_off_ptr, extra_ptr, extra_idx_ptr, scale_ptr,
                out_ptr, feat_ptr, ref_out_ptr, ref_ptr,
                LOSS: tl.constexpr, ROW_PARAMS: tl.constexpr, COL_PARAMS: tl.constexpr, NUM_PARAMS: tl.constexpr,
                HAS_SELF: tl.constexpr, SYMMETRIC: tl.constexpr, BETA_ZERO: tl.constexpr, BETA_ONE: tl.constexpr,
                GAMMA_ZERO: tl.constexpr, GAMMA_ONE: tl.constexpr, PARTIAL: tl.constexpr, NORMALIZE: tl.constexpr,
                HAS_EXTRA: tl.constexpr, HAS_REF_OUT: tl.constexpr, DP: tl.constexpr, D: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                size_key=0):
    """Feature gradients of ``BM`` own rows (backward pass): ``acc [BM, DP] = sum_tiles G @ other``.

    Grid ``(cdiv(n_own, BM), splits)``. ``G`` comes from the own rows' parameters
    (``ROW_PARAMS``: the rows are anchors) and/or the other rows' (``COL_PARAMS``: the
    other rows are anchors; both when every row is an anchor, which makes one sweep the
    whole gradient ``(G + G^T) x / t``). Each other tile feeds both products. Epilogue:
    ``PARTIAL`` stores ``acc / t * scale`` (float32) for the host to combine; otherwise it
    adds ``extra[extra_idx]`` rows, applies the normalisation's backward (with the row
    re-read from the user's tensor and normalised in float32) and stores in the output dtype
    at the row's place in the user's tensor: element offset ``out_off`` in the features (or
    ``ref_off`` in the ref rows; -1: not there). Outputs have the strides of the inputs, whose
    last dimension is contiguous (so the stores are vectorised).
    """
    split = tl.program_id(1)
    row0, rows, row_ok, own, cls_r, self_col = own_tile(own_ptr, own_cls_ptr, own_pos_ptr, n_own, BM, DP,
                                                        HAS_SELF, SYMMETRIC)
    rq0, rq1, rq2, rq3 = load_params(own_prm_ptr, rows, row_ok & ROW_PARAMS, n_own, NUM_PARAMS)
    acc = tl.zeros((BM, DP), tl.float32)
    band_lo, band_hi = special_band(self_col, pos_lo_ptr, pos_hi_ptr, row0, n_own, BM, BN, HAS_SELF, SYMMETRIC,
                                    LOSS == tm.SCHANE)
    n_plain, s0, blo, bw, n_special, slo, sw, tail = tile_ranges(n_other, split, num_splits, band_lo, band_hi,
                                                                  BN)
    for t in range(0, n_plain):  # no mask: as in the statistics kernel
        tile = s0 + t + tl.where(s0 + t >= blo, bw, 0)
        cols = tile * BN + tl.arange(0, BN)
        qk, other = tile_qk(own, other_ptr, cols, cols < n_other, DP, DOT_PRECISION, UPCAST_DOT, False)
        g = _tile_grad(qk, c1, inv_t, beta, gamma, rq0, rq1, rq2, rq3, cols, cols < n_other, other_prm_ptr, n_other,
                       False, LOSS, ROW_PARAMS, COL_PARAMS, NUM_PARAMS, BETA_ZERO, BETA_ONE, GAMMA_ZERO, GAMMA_ONE)
        acc = acc_dot(g, other, acc, DOT_PRECISION, UPCAST_DOT)
    for t in range(0, n_special):
        tile = tl.where(t < sw, slo + t, tail)
        cols = tile * BN + tl.arange(0, BN)
        col_ok = cols < n_other
        qk, other = tile_qk(own, other_ptr, cols, col_ok, DP, DOT_PRECISION, UPCAST_DOT, True)
        g = _tile_grad(qk, c1, inv_t, beta, gamma, rq0, rq1, rq2, rq3, cols, col_ok, other_prm_ptr, n_other,
                       False, LOSS, ROW_PARAMS, COL_PARAMS, NUM_PARAMS, BETA_ZERO, BETA_ONE, GAMMA_ZERO, GAMMA_ONE)
        keep = col_ok[None, :] & (cols[None, :] != self_col[:, None])
        if LOSS == tm.SCHANE:
            keep = keep & (cls_r[:, None] != tl.load(other_cls_ptr + cols, mask=col_ok, other=-1)[None, :])
        acc = acc_dot(tl.where(keep, g, 0.0), other, acc, DOT_PRECISION, UPCAST_DOT)
    if split == 0:
        # read again rather than kept from special_band: two values fewer live across the column
        # loops (keeping them spills 176 B in SCHaNe's 64x64 bfloat16 tile at D = 100 on sm_90)
        lo, hi = class_range(pos_lo_ptr, pos_hi_ptr, row0, n_own, BM)
        for c0 in range(lo, hi, BN // 2):  # narrower tiles: the positive part's math holds more registers
            cols = c0 + tl.arange(0, BN // 2)
            col_ok = cols < hi
            qk, other = tile_qk(own, other_ptr, cols, col_ok, DP, DOT_PRECISION, UPCAST_DOT, True)
            g = _tile_grad(qk, c1, inv_t, beta, gamma, rq0, rq1, rq2, rq3, cols, col_ok, other_prm_ptr, n_other,
                           True, LOSS, ROW_PARAMS, COL_PARAMS, NUM_PARAMS, BETA_ZERO, BETA_ONE, GAMMA_ZERO, GAMMA_ONE)
            if LOSS != tm.SCHANE:
                # The dense loops added the dense part of these positives rounded to the rows'
                # dtype; it nearly cancels the positive part (p_ij ~ 1/|P|), so the rounding
                # error is added back here, in a float32 product: positives are exact.
                gd = _tile_grad(qk, c1, inv_t, beta, gamma, rq0, rq1, rq2, rq3, cols, col_ok, other_prm_ptr, n_other,
                                False, LOSS, ROW_PARAMS, COL_PARAMS, NUM_PARAMS, BETA_ZERO, BETA_ONE, GAMMA_ZERO,
                                GAMMA_ONE)
                g += gd - gd.to(other.dtype).to(tl.float32)
            cls_c = tl.load(other_cls_ptr + cols, mask=col_ok, other=-1)
            pos = col_ok[None, :] & (cls_r[:, None] == cls_c[None, :]) & (cols[None, :] != self_col[:, None])
            acc = tl.dot(tl.where(pos, g, 0.0), other.to(tl.float32), acc,
                         input_precision="ieee" if UPCAST_DOT else DOT_PRECISION)
    g = acc * (inv_t * tl.load(scale_ptr))
    d = tl.arange(0, DP)
    if PARTIAL:
        tl.store(partial_ptr + (split * n_own + rows.to(tl.int64))[:, None] * DP + d[None, :], g,
                 mask=row_ok[:, None])
    else:
        if HAS_EXTRA:
            e = tl.load(extra_idx_ptr + rows, mask=row_ok, other=-1)
            g += tl.load(extra_ptr + e.to(tl.int64)[:, None] * DP + d[None, :], mask=(e >= 0)[:, None], other=0.0)
        store_rows(g, rows, row_ok, inv_norm_ptr, out_off_ptr, ref_off_ptr, out_ptr, feat_ptr, ref_out_ptr, ref_ptr,
                   NORMALIZE, HAS_REF_OUT, DP, D)


