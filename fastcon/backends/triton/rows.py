"""The O(N) kernels around the two sweeps: everything the single-device path does per row,
so that a forward+backward launches a handful of kernels and no PyTorch op per row.

- :func:`prep_side_kernel` lays out one side (the contrast rows, or the anchors): the user's
  rows normalised, cast, padded and sorted by class, and each row's class id and class range
  in the other side, found by binary search in the sorted labels (no ``unique``, no
  ``cumsum``, no ``searchsorted`` op);
- :func:`finalize_kernel` merges the column splits of the statistics, counts each anchor's
  positives and negatives from its class range, turns the statistics into the loss and the
  gradient parameters with the definition's math (:mod:`.tile_math`), and reduces: the loss
  of ``"mean"`` / ``"sum"``, or the per-anchor losses in the user's order for ``"none"``;
- :func:`store_kernel` sums the column splits of a gradient sweep and stores the gradient
  in the user's layout and dtype (the epilogue a one-split sweep runs itself).

No atomics: every output element is written by one program, and the reductions of
:func:`finalize_kernel` run in one program in a fixed order, so results are bitwise
reproducible.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tile_math as tm
from .tiles import store_rows

MODE_REDUCED = tl.constexpr(0)  # the "mean" / "sum" loss
MODE_ROWS = tl.constexpr(1)  # per-anchor losses and validity in the user's order ("none")
MODE_WEIGHTED = tl.constexpr(2)  # gradient parameters of sum_i w_i l_i (the backward of "none")


@triton.jit
def _search(sorted_ptr, n, y, steps, RIGHT: tl.constexpr):
    """For each ``y``: the first index of ``sorted[0:n]`` (non-decreasing) holding a value
    ``>= y`` (``RIGHT``: ``> y``). ``steps >= bit_length(n)``."""
    lo = tl.zeros(y.shape, tl.int32)
    hi = lo + n
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(sorted_ptr + mid, mask=active, other=0)
        if RIGHT:
            right = v <= y
        else:
            right = v < y
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def prep_side_kernel(feat_ptr, ref_ptr, order_ptr, y_ptr, n_labelled, cls_y_ptr, n_cls, range_y_ptr, n_range,
                     steps, x_ptr, inv_ptr, cls_ptr, lo_ptr, hi_ptr, where_ptr, self_where_ptr, pos_ptr,
                     other_pos_ptr, out_off_ptr, ref_off_ptr, n, M, B, D, stride_b, stride_v, stride_d, stride_r,
                     stride_rd, NORMALIZE: tl.constexpr, HAS_REF: tl.constexpr, WRITE_WHERE: tl.constexpr,
                     INIT_POS: tl.constexpr, SELF_FROM: tl.constexpr, OFFSETS: tl.constexpr,
                     BLOCK_R: tl.constexpr, DP: tl.constexpr, BLOCK_DP: tl.constexpr):
    """One side of a sweep, ``n`` rows. Grid: ``cdiv(n, BLOCK_R)``.

    Sorted row ``p < n_labelled`` is flat row ``order[p]`` with label ``y[p]`` (``y`` sorted);
    rows ``p >= n_labelled`` are unlabelled flat rows ``p`` (ref rows without a label, last).
    A flat row ``r`` is view-major ``v*B + b`` of the features below ``M``, ``ref[r - M]``
    above. Writes ``x [n, DP]`` (normalised in float32, cast, zero-padded) and ``inv_norm``;
    ``cls``: the row's class id, the first index of its label in ``cls_y[0:n_cls]`` (the
    contrast rows' sorted labels; ``n_cls`` for unlabelled rows: a class no labelled row has);
    ``[lo, hi)``: its label's range in ``range_y[0:n_range]`` (the other side's sorted labels;
    empty at ``n_range`` for unlabelled rows). ``WRITE_WHERE``: ``where[r] = p``.
    ``INIT_POS``: ``pos[p] = -1``. ``SELF_FROM``: the row's self column ``self_where[r]`` in
    the other side goes to ``pos[p]``, and ``p`` to ``other_pos`` at that column. ``OFFSETS``:
    where the row's gradient goes, as element offsets into tensors with the strides of the
    features (``out_off``) or of the ref rows (``ref_off``), -1 in the other.
    """
    p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = p < n
    labelled = ok & (p < n_labelled)
    # the class and its range first: the searches hold nothing of the row
    y = tl.load(y_ptr + p, mask=labelled, other=0)
    tl.store(cls_ptr + p, tl.where(labelled, _search(cls_y_ptr, n_cls, y, steps, False), n_cls), mask=ok)
    tl.store(lo_ptr + p, tl.where(labelled, _search(range_y_ptr, n_range, y, steps, False), n_range), mask=ok)
    tl.store(hi_ptr + p, tl.where(labelled, _search(range_y_ptr, n_range, y, steps, True), n_range), mask=ok)
    r32 = tl.where(labelled, tl.load(order_ptr + p, mask=labelled, other=0), p).to(tl.int32)
    sample, view = (r32 % B).to(tl.int64), (r32 // B).to(tl.int64)  # 32-bit division: no call, no stack
    r = r32.to(tl.int64)
    d = tl.arange(0, BLOCK_DP)
    d_ok = d < D
    is_batch = r < M
    src = feat_ptr + sample[:, None] * stride_b + view[:, None] * stride_v + d[None, :] * stride_d
    v = tl.load(src, mask=(ok & is_batch)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if HAS_REF:
        rsrc = ref_ptr + (r - M)[:, None] * stride_r + d[None, :] * stride_rd
        v += tl.load(rsrc, mask=(ok & ~is_batch)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    inv = tl.full((BLOCK_R,), 1.0, tl.float32)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(v * v, 1)), 1e-12)
        v = v * inv[:, None]
    tl.store(x_ptr + p.to(tl.int64)[:, None] * DP + d[None, :], v.to(x_ptr.dtype.element_ty),
             mask=ok[:, None] & (d < DP)[None, :])
    tl.store(inv_ptr + p, inv, mask=ok)
    if OFFSETS:
        tl.store(out_off_ptr + p, tl.where(is_batch, sample * stride_b + view * stride_v, -1), mask=ok)
        tl.store(ref_off_ptr + p, tl.where(is_batch, -1, (r - M) * stride_r), mask=ok)
    if WRITE_WHERE:
        tl.store(where_ptr + r, p, mask=ok)
    if INIT_POS:
        tl.store(pos_ptr + p, p * 0 - 1, mask=ok)
    if SELF_FROM:
        c = tl.load(self_where_ptr + r, mask=ok, other=0)
        tl.store(pos_ptr + p, c, mask=ok)
        tl.store(other_pos_ptr + c, p, mask=ok)


@triton.jit
def _slot(part_ptr, slot, idx, ok, n, splits, split_stride, IS_SUM: tl.constexpr):
    """Statistic ``slot`` of rows ``idx`` merged over the column splits, in split order."""
    v = tl.load(part_ptr + slot * n + idx, mask=ok, other=0.0)
    for s in range(1, splits):
        w = tl.load(part_ptr + s * split_stride + slot * n + idx, mask=ok, other=0.0)
        if IS_SUM:
            v = v + w
        else:
            v = tm.logaddexp(v, w)
    return v


@triton.jit
def finalize_kernel(part_ptr, splits, n, lo_ptr, hi_ptr, num_contrast, grad_rows_ptr, order_ptr, stats_ptr,
                    params_ptr, scale_ptr, loss_ptr, valid_ptr, total_ptr, n_valid_ptr,
                    loss_scale, beta, coef_target,
                    LOSS: tl.constexpr, MODE: tl.constexpr, MEAN: tl.constexpr, WITH_PARAMS: tl.constexpr,
                    NUM_DENSE: tl.constexpr, NUM_POSITIVE: tl.constexpr, DENSE_SUMS: tl.constexpr,
                    NUM_PARAMS: tl.constexpr, WEIGHT_PARAMS: tl.constexpr, SCALE_COEFS: tl.constexpr,
                    BETA_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """The row statistics of ``n`` anchors (their sorted order) into the loss. Grid: ``(1,)``:
    one program walks the rows in ``BLOCK`` chunks, so its sums are in a fixed order.

    ``part [splits, NUM_DENSE + 2, n]``: the statistics kernel's output, dense slots of every
    split (merged by log-add-exp, or by addition where bit k of ``DENSE_SUMS`` is set), the
    positive slots of split 0. ``[lo, hi)``: each anchor's class range in the contrast rows,
    so ``|P| = hi - lo - 1`` and ``|N| = num_contrast - (hi - lo)``. ``MODE``:
    ``MODE_REDUCED`` writes ``total`` (the loss, over ``max(n_valid, 1)`` when ``MEAN``) and
    ``n_valid``; ``MODE_ROWS`` the per-anchor loss and validity at ``order[p]`` (the user's
    anchor order) and the merged statistics into ``stats [NUM_DENSE + 2, n]`` (one split's layout);
    ``MODE_WEIGHTED`` weighs anchor p by ``grad_rows[order[p]]``. ``WITH_PARAMS``: the gradient
    parameters ``params [NUM_PARAMS, n]`` and ``scale``, the factor the gradient kernels
    multiply by: ``1 / max(n_valid, 1)`` for ``"mean"`` times, with ``SCALE_COEFS`` (float16
    products), ``max |weight parameter| / coef_target``, which the rows of ``params`` set in
    ``WEIGHT_PARAMS`` (a bit mask) are divided by, so that float16 coefficients cannot overflow.
    """
    split_stride = (NUM_DENSE + 2) * n
    divisor = 1.0
    acc_loss = tl.zeros((BLOCK,), tl.float32)
    acc_valid = tl.zeros((BLOCK,), tl.int32)
    acc_max = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < n
        d0 = _slot(part_ptr, 0, idx, ok, n, splits, split_stride, (DENSE_SUMS & 1) != 0)
        d1 = d0
        if NUM_DENSE == 2:
            d1 = _slot(part_ptr, 1, idx, ok, n, splits, split_stride, (DENSE_SUMS & 2) != 0)
        p0 = tl.load(part_ptr + NUM_DENSE * n + idx, mask=ok, other=0.0)
        p1 = p0
        if NUM_POSITIVE == 2:
            p1 = tl.load(part_ptr + (NUM_DENSE + 1) * n + idx, mask=ok, other=0.0)
        same = (tl.load(hi_ptr + idx, mask=ok, other=1) - tl.load(lo_ptr + idx, mask=ok, other=0)).to(tl.float32)
        w = tl.full((BLOCK,), 1.0, tl.float32)
        if MODE != MODE_REDUCED:
            at = tl.load(order_ptr + idx, mask=ok, other=0)
        if MODE == MODE_WEIGHTED:
            w = tl.load(grad_rows_ptr + at, mask=ok, other=0.0).to(tl.float32)
        loss, valid, q0, q1, q2, q3 = tm.finalize_rows(d0, d1, p0, p1, same - 1.0, num_contrast - same, w,
                                                       loss_scale, num_contrast, beta, LOSS, BETA_ZERO)
        valid = valid & ok
        if MODE == MODE_REDUCED:
            acc_loss += tl.where(valid, loss, 0.0)
            acc_valid += valid.to(tl.int32)
        if MODE == MODE_ROWS:
            tl.store(loss_ptr + at, loss, mask=ok)
            tl.store(valid_ptr + at, valid.to(tl.int8), mask=ok)
            tl.store(stats_ptr + idx, d0, mask=ok)
            if NUM_DENSE == 2:
                tl.store(stats_ptr + n + idx, d1, mask=ok)
            tl.store(stats_ptr + NUM_DENSE * n + idx, p0, mask=ok)
            tl.store(stats_ptr + (NUM_DENSE + 1) * n + idx, p1 if NUM_POSITIVE == 2 else p1 * 0.0, mask=ok)
        if WITH_PARAMS:
            tl.store(params_ptr + idx, q0, mask=ok)
            tl.store(params_ptr + n + idx, q1, mask=ok)
            tl.store(params_ptr + 2 * n + idx, q2, mask=ok)
            if NUM_PARAMS == 4:
                tl.store(params_ptr + 3 * n + idx, q3, mask=ok)
            if SCALE_COEFS:
                acc_max = _weight_max(acc_max, q0, q1, q2, q3, ok, WEIGHT_PARAMS)
    if MODE == MODE_REDUCED:
        n_valid = tl.sum(acc_valid, 0)
        if MEAN:
            divisor = tl.maximum(n_valid, 1).to(tl.float32)
        tl.store(total_ptr, tl.sum(acc_loss, 0) / divisor)
        tl.store(n_valid_ptr, n_valid.to(tl.int64))
    if WITH_PARAMS:
        scale = 1.0
        if MODE == MODE_REDUCED:
            scale = 1.0 / divisor
        if SCALE_COEFS:
            c = tl.maximum(tl.max(acc_max, 0), 1e-30) / coef_target
            tl.debug_barrier()  # the parameters written above, by other threads of this program
            for start in range(0, n, BLOCK):
                idx = start + tl.arange(0, BLOCK)
                ok = idx < n
                for k in tl.static_range(NUM_PARAMS):
                    if ((WEIGHT_PARAMS >> k) & 1) != 0:
                        q = tl.load(params_ptr + k * n + idx, mask=ok, other=0.0)
                        tl.store(params_ptr + k * n + idx, q / c, mask=ok)
            scale = scale * c
        tl.store(scale_ptr, scale)


@triton.jit
def _weight_max(acc, q0, q1, q2, q3, ok, WEIGHT_PARAMS: tl.constexpr):
    if (WEIGHT_PARAMS & 1) != 0:
        acc = tl.maximum(acc, tl.where(ok, tl.abs(q0), 0.0))
    if (WEIGHT_PARAMS & 2) != 0:
        acc = tl.maximum(acc, tl.where(ok, tl.abs(q1), 0.0))
    if (WEIGHT_PARAMS & 4) != 0:
        acc = tl.maximum(acc, tl.where(ok, tl.abs(q2), 0.0))
    if (WEIGHT_PARAMS & 8) != 0:
        acc = tl.maximum(acc, tl.where(ok, tl.abs(q3), 0.0))
    return acc


@triton.jit
def store_kernel(partial_ptr, splits, n, extra_ptr, extra_splits, n_extra, extra_idx_ptr, inv_norm_ptr,
                 out_off_ptr, ref_off_ptr, out_ptr, feat_ptr, ref_out_ptr, ref_ptr,
                 NORMALIZE: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_REF_OUT: tl.constexpr, DP: tl.constexpr,
                 D: tl.constexpr, BM: tl.constexpr):
    """The epilogue of a split gradient sweep. Grid: ``cdiv(n, BM)``. Row ``p``'s gradient is
    the sum over splits of ``partial [splits, n, DP]`` plus, with ``HAS_EXTRA``, the sum over
    splits of ``extra [extra_splits, n_extra, DP]`` at row ``extra_idx[p]`` (-1: none); it is
    stored as :func:`.tiles.store_rows` says."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    d = tl.arange(0, DP)
    r64 = rows.to(tl.int64)
    g = tl.zeros((BM, DP), tl.float32)
    for s in range(0, splits):
        g += tl.load(partial_ptr + (s * n + r64)[:, None] * DP + d[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_EXTRA:
        e = tl.load(extra_idx_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        for s in range(0, extra_splits):
            g += tl.load(extra_ptr + (s * n_extra + e)[:, None] * DP + d[None, :], mask=(e >= 0)[:, None],
                         other=0.0)
    store_rows(g, rows, row_ok, inv_norm_ptr, out_off_ptr, ref_off_ptr, out_ptr, feat_ptr, ref_out_ptr, ref_ptr,
               NORMALIZE, HAS_REF_OUT, DP, D)
