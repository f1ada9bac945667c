"""Triton kernels of fastcon: one family for every loss, never an N x N tensor.

Layout shared by every kernel:

- ``x [K, D]`` holds the contrast rows (``cat(z, ref)``) in the dot-product dtype
  (float32, or bfloat16 / float16 for half-precision users); the anchors are its
  first ``A`` rows, and anchor ``i`` is contrast column ``i`` ("self").
- ``y [K]`` holds the labels (as int32 ranks); positive / negative masks are compared inside
  the kernel, one ``[BLOCK_M, BLOCK_N]`` tile at a time.
- A similarity tile ``s = x[rows] . x[cols]^T / t`` is built by a loop over D in
  chunks of ``BLOCK_D`` with float32 accumulation, so any D works.

Per-loss differences are switched by the ``LOSS`` constexpr (``SUPCON``, ``SCHANE``,
``FOCAL``); the masked log-sum-exps are streamed with the running-max trick.

``row_stats_kernel`` (forward) writes per-anchor float32 statistics ``stats [5, A]``:

    SupCon: lse_all, sum of s over P, |P|
    SCHaNe: lse_P(s), lse_N((1+beta) s), lse_N(beta s), |P|, |N|
    focal : lse_all, |P|, then (second launch, FOCAL_TERMS) sum_P f(L), sum_P f'(L)
            with L = log p_ij, f(L) = (1 - e^L)^gamma L

``grad_kernel`` (backward) recomputes each tile, turns it into ``G_ij = dl_i/ds_ij``
(times the anchor's weight) from per-anchor parameters ``prm [5, A]`` prepared on the
host from the statistics, and multiplies:

    WRT_CONTRAST = False: d anchors  [A, D] = G   @ x / t   (program = block of anchors)
    WRT_CONTRAST = True : d contrast [C, D] = G^T @ x[:A] / t (program = block of columns)

Every output element is written by exactly one program, in a fixed loop order:
the results are bitwise deterministic, without atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

SUPCON = tl.constexpr(0)
SCHANE = tl.constexpr(1)
FOCAL = tl.constexpr(2)

NUM_STATS = 5  # rows of the per-anchor statistics and of the gradient parameters


@triton.jit
def _similarity_tile(x_ptr, rows, cols, row_ok, col_ok, D, inv_t,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``s [BLOCK_M, BLOCK_N] = x[rows] . x[cols]^T / t`` with a float32 accumulator."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_base = rows.to(tl.int64) * D
    col_base = cols.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        a = tl.load(x_ptr + row_base[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(x_ptr + col_base[:, None] + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(a, tl.trans(c), acc, DOT_PRECISION, UPCAST_DOT)
    return acc * inv_t


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b``. ``UPCAST_DOT`` multiplies half-precision operands in float32: the
    CPU interpreter's bfloat16 ``tl.dot`` is wrong (the operands keep their rounding)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _online_lse(run_max, run_sum, x):
    """Fold the rows of ``x`` (-inf where masked out) into a running ``(max, sum of exp(. - max))``."""
    new_max = tl.maximum(run_max, tl.max(x, 1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # an empty row so far stays (-inf, 0)
    run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
    return new_max, run_sum


@triton.jit
def _focal_terms(s, lse, gamma, GAMMA_ZERO: tl.constexpr):
    """For L = s - lse (log p; ``lse`` broadcasts against ``s``): ``(p, f(L), f'(L))``
    with f(L) = (1 - e^L)^gamma L."""
    log_p = s - lse
    p = tl.exp(log_p)
    # 1 - e^L without cancellation near L = 0 (p close to 1): a Taylor series of -expm1
    series = -log_p * (1.0 + log_p * (0.5 + log_p * (1.0 / 6.0 + log_p * (1.0 / 24.0 + log_p * (1.0 / 120.0)))))
    one_minus_p = tl.where(log_p > -0.1, series, 1.0 - p)
    if GAMMA_ZERO:
        weight = tl.full(s.shape, 1.0, tl.float32)
        fprime = weight
    else:
        has_mass = one_minus_p > 0
        log2_omp = tl.log2(tl.where(has_mass, one_minus_p, 1.0))
        weight = tl.where(has_mass, tl.exp2(gamma * log2_omp), 0.0)
        # f'(L) = (1-p)^gamma - gamma (1-p)^(gamma-1) p L
        tail = tl.where(has_mass, gamma * tl.exp2((gamma - 1.0) * log2_omp) * p * log_p, 0.0)
        fprime = weight - tail
    return p, weight * log_p, fprime


@triton.jit
def row_stats_kernel(x_ptr, y_ptr, stats_ptr, A, K, D, inv_t,
                     beta, gamma, K_BUCKET,
                     LOSS: tl.constexpr, FOCAL_TERMS: tl.constexpr,
                     BETA_ZERO: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Per-anchor statistics of one block of anchors (forward pass).

    Grid: ``(cdiv(A, BLOCK_M),)``. Each program owns ``BLOCK_M`` anchors and sweeps the
    K contrast columns in ``BLOCK_N`` tiles (tile ``s [BLOCK_M, BLOCK_N]`` in registers,
    operand chunks ``[BLOCK_M | BLOCK_N, BLOCK_D]``). It keeps ``BLOCK_M``-vectors of
    running maxima, sums and counts and writes ``stats [5, A]`` (float32; layout in the
    module docstring). With ``FOCAL_TERMS`` it reads focal's ``lse_all`` (row 0) from
    a first launch and writes the focal sums (rows 2 and 3). ``K_BUCKET`` only keys
    the autotuner.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < A
    y_row = tl.load(y_ptr + rows, mask=row_ok, other=0)
    neg_inf = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    m_a, l_a = neg_inf, zero  # lse_all (SupCon, focal) or lse_P (SCHaNe)
    m_b, l_b = neg_inf, zero  # lse_N((1+beta) s) (SCHaNe)
    m_c, l_c = neg_inf, zero  # lse_N(beta s) (SCHaNe)
    sum_pos, n_pos, n_neg = zero, zero, zero
    loss_sum, fprime_sum = zero, zero
    if FOCAL_TERMS:
        lse_all = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    for c0 in range(0, K, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        s = _similarity_tile(x_ptr, rows, cols, row_ok, col_ok, D, inv_t, BLOCK_M, BLOCK_N, BLOCK_D,
                             DOT_PRECISION, UPCAST_DOT)
        y_col = tl.load(y_ptr + cols, mask=col_ok, other=0)
        same = y_row[:, None] == y_col[None, :]
        in_contrast = col_ok[None, :] & (rows[:, None] != cols[None, :])  # A(i): every column but self
        pos = in_contrast & same
        if FOCAL_TERMS:
            _, f, fprime = _focal_terms(s, lse_all[:, None], gamma, GAMMA_ZERO)
            loss_sum += tl.sum(tl.where(pos, f, 0.0), 1)
            fprime_sum += tl.sum(tl.where(pos, fprime, 0.0), 1)
        else:
            n_pos += tl.sum(pos.to(tl.float32), 1)
            if LOSS == SCHANE:
                neg = col_ok[None, :] & (y_row[:, None] != y_col[None, :])
                n_neg += tl.sum(neg.to(tl.float32), 1)
                m_a, l_a = _online_lse(m_a, l_a, tl.where(pos, s, float("-inf")))
                m_b, l_b = _online_lse(m_b, l_b, tl.where(neg, (1.0 + beta) * s, float("-inf")))
                if not BETA_ZERO:
                    m_c, l_c = _online_lse(m_c, l_c, tl.where(neg, beta * s, float("-inf")))
            else:
                m_a, l_a = _online_lse(m_a, l_a, tl.where(in_contrast, s, float("-inf")))
                if LOSS == SUPCON:
                    sum_pos += tl.sum(tl.where(pos, s, 0.0), 1)
    if FOCAL_TERMS:
        tl.store(stats_ptr + 2 * A + rows, loss_sum, mask=row_ok)
        tl.store(stats_ptr + 3 * A + rows, fprime_sum, mask=row_ok)
    else:
        tl.store(stats_ptr + rows, m_a + tl.log(l_a), mask=row_ok)
        if LOSS == SUPCON:
            tl.store(stats_ptr + A + rows, sum_pos, mask=row_ok)
            tl.store(stats_ptr + 2 * A + rows, n_pos, mask=row_ok)
        elif LOSS == SCHANE:
            tl.store(stats_ptr + A + rows, m_b + tl.log(l_b), mask=row_ok)
            tl.store(stats_ptr + 2 * A + rows, m_c + tl.log(l_c), mask=row_ok)
            tl.store(stats_ptr + 3 * A + rows, n_pos, mask=row_ok)
            tl.store(stats_ptr + 4 * A + rows, n_neg, mask=row_ok)
        else:
            tl.store(stats_ptr + A + rows, n_pos, mask=row_ok)


@triton.jit
def _gradient_tile(s, anchor, other, anchor_ok, other_ok, y_anchor, y_other, prm_ptr, A, beta, gamma,
                   LOSS: tl.constexpr, BETA_ZERO: tl.constexpr, GAMMA_ZERO: tl.constexpr):
    """``G = w_i dl_i/ds_ij`` of one tile from the anchors' parameters ``prm [5, A]``.

    The index arguments are broadcastable 2-D: ``anchor`` ``[BLOCK_M, 1]`` and ``other``
    ``[1, BLOCK_N]`` give ``G_ij`` for the tile's rows as anchors; swapped, they give
    ``G_ji`` (the transposed tile's values, from the columns' parameters), which the
    symmetric backward needs. prm rows: SupCon (lse_all, -, -, c_i, c_i/|P|); SCHaNe
    (lse_P, lse_N1, lse_Nb, c_i, -); focal (lse_all, -, -, c_i, c_i sum_P f'). ``c_i`` is
    zero at invalid or zero-weight anchors, whose G is zero.
    """
    lse_a = tl.load(prm_ptr + anchor, mask=anchor_ok, other=0.0)
    coef = tl.load(prm_ptr + 3 * A + anchor, mask=anchor_ok, other=0.0)
    same = y_anchor == y_other
    in_contrast = other_ok & (anchor != other)
    pos = in_contrast & same
    if LOSS == SUPCON:
        # scale w_i (softmax_A(s)_ij - [j in P(i)] / |P(i)|)
        per_pos = tl.load(prm_ptr + 4 * A + anchor, mask=anchor_ok, other=0.0)
        g = coef * tl.exp(s - lse_a) - tl.where(pos, per_pos, 0.0)
    elif LOSS == SCHANE:
        # sigmoid(u_i) w_i times: -softmax_P(s) on P, (1+b) softmax_N((1+b)s) - b softmax_N(b s) on N
        lse_n1 = tl.load(prm_ptr + A + anchor, mask=anchor_ok, other=0.0)
        g_neg = (1.0 + beta) * tl.exp((1.0 + beta) * s - lse_n1)
        if not BETA_ZERO:
            lse_nb = tl.load(prm_ptr + 2 * A + anchor, mask=anchor_ok, other=0.0)
            g_neg -= beta * tl.exp(beta * s - lse_nb)
        neg = other_ok & (y_anchor != y_other)
        g = coef * tl.where(neg, g_neg, tl.where(pos, -tl.exp(s - lse_a), 0.0))
    else:
        # -scale/K w_i ([j in P] f'(L_ij) - p_ij sum_P f'(L_i.))
        coef_fsum = tl.load(prm_ptr + 4 * A + anchor, mask=anchor_ok, other=0.0)
        p, _, fprime = _focal_terms(s, lse_a, gamma, GAMMA_ZERO)
        g = coef * tl.where(pos, fprime, 0.0) - coef_fsum * p
    active = in_contrast & (coef != 0.0)
    return tl.where(active, g, 0.0)


@triton.jit
def grad_kernel(x_ptr, y_ptr, prm_ptr, out_ptr, anchor_grad_ptr, A, K, num_out, D, inv_t,
                beta, gamma, K_BUCKET,
                LOSS: tl.constexpr, WRT_CONTRAST: tl.constexpr, SYMMETRIC: tl.constexpr,
                BETA_ZERO: tl.constexpr, GAMMA_ZERO: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DO: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Feature gradients of ``sum_i w_i l_i`` (backward pass), float32 ``out [num_out, D]``.

    Grid: ``(cdiv(num_out, BLOCK_M or BLOCK_N), cdiv(D, BLOCK_DO))``. A program owns one
    block of output rows and one ``BLOCK_DO`` chunk of D, keeps a float32 accumulator
    ``[BLOCK_M | BLOCK_N, BLOCK_DO]`` and sweeps the other side of the similarity
    matrix, recomputing each ``s [BLOCK_M, BLOCK_N]`` tile and its ``G`` tile(s).

    ``WRT_CONTRAST = False``: outputs are anchors (``num_out = A``), ``out = G x / t``.
    With ``SYMMETRIC`` (every contrast row is an anchor: ``A = K``) the same sweep
    also adds ``G^T``: ``out = (G + G^T) x / t`` is the whole gradient, one sweep
    instead of two. ``G^T``'s tile comes from the same ``s`` tile (``s`` is symmetric)
    with the columns' parameters.
    ``WRT_CONTRAST = True``: outputs are contrast columns (``num_out <= K``: columns
    past ``num_out`` get no gradient), ``out = G^T x[:A] / t``, plus the anchor gradient
    ``anchor_grad [A, D]`` for columns that are anchors, so the total gradient of z needs
    no separate buffer and sum.
    """
    pid = tl.program_id(0)
    offs_do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    dot_dtype = x_ptr.dtype.element_ty
    if WRT_CONTRAST:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        y_col = tl.load(y_ptr + cols, mask=col_ok, other=0)
        acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
        for r0 in range(0, A, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < A
            y_row = tl.load(y_ptr + rows, mask=row_ok, other=0)
            s = _similarity_tile(x_ptr, rows, cols, row_ok, col_ok, D, inv_t,
                                 BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
            g = _gradient_tile(s, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :],
                               y_row[:, None], y_col[None, :], prm_ptr, A, beta, gamma,
                               LOSS, BETA_ZERO, GAMMA_ZERO)
            anchors = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + offs_do[None, :],
                              mask=row_ok[:, None] & do_ok[None, :], other=0.0)
            acc = _dot(tl.trans(g.to(dot_dtype)), anchors, acc, DOT_PRECISION, UPCAST_DOT)
        out_ok = cols < num_out
        col_offsets = cols.to(tl.int64)[:, None] * D + offs_do[None, :]
        as_anchor = tl.load(anchor_grad_ptr + col_offsets, mask=(cols < A)[:, None] & do_ok[None, :], other=0.0)
        tl.store(out_ptr + col_offsets, acc * inv_t + as_anchor, mask=out_ok[:, None] & do_ok[None, :])
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < A
        y_row = tl.load(y_ptr + rows, mask=row_ok, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
        for c0 in range(0, K, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < K
            y_col = tl.load(y_ptr + cols, mask=col_ok, other=0)
            s = _similarity_tile(x_ptr, rows, cols, row_ok, col_ok, D, inv_t,
                                 BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
            g = _gradient_tile(s, rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :],
                               y_row[:, None], y_col[None, :], prm_ptr, A, beta, gamma,
                               LOSS, BETA_ZERO, GAMMA_ZERO)
            if SYMMETRIC:
                g += _gradient_tile(s, cols[None, :], rows[:, None], col_ok[None, :], row_ok[:, None],
                                    y_col[None, :], y_row[:, None], prm_ptr, A, beta, gamma,
                                    LOSS, BETA_ZERO, GAMMA_ZERO)
            contrast = tl.load(x_ptr + cols.to(tl.int64)[:, None] * D + offs_do[None, :],
                               mask=col_ok[:, None] & do_ok[None, :], other=0.0)
            acc = _dot(g.to(dot_dtype), contrast, acc, DOT_PRECISION, UPCAST_DOT)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + offs_do[None, :], acc * inv_t,
                 mask=row_ok[:, None] & do_ok[None, :])
