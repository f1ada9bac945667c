"""The Triton copy of each loss's tile math (what each statistic and parameter means is in
``fastcon/losses/*.py``; their order here is the definitions' slot order).

Every function works on one tile ``qk [BM, BN]`` of raw dot products of normalised rows
(``s = qk / t``) in the log2 domain: ``c1 = log2(e) / t``, so ``exp(s - lse)`` is
``exp2(qk * c1 - lse * LOG2E)``: one FMA and one ``MUFU.EX2`` per element. The kernels
(:mod:`.kernels`) own the loops and masks and call these with ``LOSS`` (a definition's
``kernel_id``) as a constexpr. Parameters are broadcastable: ``[BM, 1]`` vectors give
``G_ij`` from the rows' parameters, ``[1, BN]`` vectors give ``G_ji`` (the transposed
tile, from the columns' parameters) from the same ``qk``, since ``s`` is symmetric.

Dense running state (four ``[BM]`` vectors, ``r0..r3``): SupCon and focal keep the row
max of ``qk`` and the sum of ``exp2(c1 (qk - max))``; SCHaNe keeps the max (and, for a
negative beta, the min) of ``qk`` over the negatives and the two sums. Positive state
(``p0..p2``): SupCon's sum of ``qk``; SCHaNe's max and sum; focal's two sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

SUPCON = tl.constexpr(0)
SCHANE = tl.constexpr(1)
FOCAL = tl.constexpr(2)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _rescale(old_max, new_max, scale):
    """``exp2(scale * (old - new))`` of a running max; 0 while the old max is still -inf."""
    return tl.where(old_max == float("-inf"), 0.0, tl.exp2(scale * (old_max - new_max)))


@triton.jit
def logaddexp(a, b):
    """``log(e^a + e^b)``; ``-inf`` when both are (the merge of two log-sum-exps)."""
    m = tl.maximum(a, b)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(m == float("-inf"), m, safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def _shift(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def dense_update(qk, keep, neg, c1, beta, r0, r1, r2, r3, LOSS: tl.constexpr, MASKED: tl.constexpr,
                 BETA_ZERO: tl.constexpr, BETA_ONE: tl.constexpr, BETA_NEG: tl.constexpr):
    """Fold one tile into the dense state. Read only when ``MASKED`` (otherwise every column
    counts): ``keep``, the columns in A(i); ``neg``, the columns in N(i) (SCHaNe)."""
    if LOSS == SCHANE:
        # masked columns hold -inf, so their exponentials are 0 without a select per sum
        # (a beta of -1 or less would turn -inf into +inf: those keep the selects)
        x = qk
        y = qk
        if MASKED:
            x = tl.where(neg, qk, float("-inf"))
            y = tl.where(neg, qk, float("inf"))
        m = tl.maximum(r0, tl.max(x, 1))
        lo = r3
        if BETA_NEG:
            lo = tl.minimum(r3, tl.min(y, 1))
        # shifts: (1+b) * (max or min) and b * (max or min), whichever bounds the scaled set
        hi1 = tl.where(1.0 + beta >= 0.0, m, lo)
        hib = tl.where(beta >= 0.0, m, lo)
        old1 = tl.where(1.0 + beta >= 0.0, r0, r3)
        oldb = tl.where(beta >= 0.0, r0, r3)
        if BETA_ONE:
            e = tl.exp2(x * c1 - (c1 * _shift(m))[:, None])
            r1 = r1 * _rescale(r0, m, 2.0 * c1) + tl.sum(e * e, 1)
            r2 = r2 * _rescale(r0, m, c1) + tl.sum(e, 1)
        elif BETA_NEG:
            u = qk * c1
            e1 = tl.exp2((1.0 + beta) * u - ((1.0 + beta) * c1 * _shift(hi1))[:, None])
            eb = tl.exp2(beta * u - (beta * c1 * _shift(hib))[:, None])
            if MASKED:
                e1 = tl.where(neg, e1, 0.0)
                eb = tl.where(neg, eb, 0.0)
            r1 = r1 * _rescale(old1, hi1, (1.0 + beta) * c1) + tl.sum(e1, 1)
            r2 = r2 * _rescale(oldb, hib, beta * c1) + tl.sum(eb, 1)
        else:
            u = x * c1
            e1 = tl.exp2((1.0 + beta) * u - ((1.0 + beta) * c1 * _shift(hi1))[:, None])
            r1 = r1 * _rescale(old1, hi1, (1.0 + beta) * c1) + tl.sum(e1, 1)
            if not BETA_ZERO:
                eb = tl.exp2(beta * u - (beta * c1 * _shift(hib))[:, None])
                r2 = r2 * _rescale(oldb, hib, beta * c1) + tl.sum(eb, 1)
        return m, r1, r2, lo
    else:
        x = qk
        if MASKED:
            x = tl.where(keep, qk, float("-inf"))
        m = tl.maximum(r0, tl.max(x, 1))
        p = tl.exp2(x * c1 - (c1 * _shift(m))[:, None])
        return m, r1 * _rescale(r0, m, c1) + tl.sum(p, 1), r2, r3


@triton.jit
def dense_finish(r0, r1, r2, r3, c1, beta, LOSS: tl.constexpr):
    """The dense statistics in natural-log units: ``(slot 0, slot 1)`` (slot 1 unused but by SCHaNe)."""
    if LOSS == SCHANE:
        hi1 = tl.where(1.0 + beta >= 0.0, r0, r3)
        hib = tl.where(beta >= 0.0, r0, r3)
        hard = ((1.0 + beta) * c1 * _shift(hi1) + tl.log2(r1)) * LN2
        weight = (beta * c1 * _shift(hib) + tl.log2(r2)) * LN2
        return hard, weight
    return (c1 * _shift(r0) + tl.log2(r1)) * LN2, r1


@triton.jit
def focal_terms(log_p, gamma, GAMMA_ZERO: tl.constexpr, GAMMA_ONE: tl.constexpr):
    """``(p, f(L), f'(L))`` for ``L = log p <= 0`` with ``f = (1-p)^gamma L``."""
    p = tl.exp2(log_p * LOG2E)
    # 1 - e^L without cancellation near L = 0 (p close to 1): the Taylor series of -expm1
    series = -log_p * (1.0 + log_p * (0.5 + log_p * (1.0 / 6.0 + log_p * (1.0 / 24.0 + log_p * (1.0 / 120.0)))))
    one_minus_p = tl.where(log_p > -0.1, series, 1.0 - p)
    if GAMMA_ZERO:
        return p, log_p, tl.full(log_p.shape, 1.0, tl.float32)
    if GAMMA_ONE:
        return p, one_minus_p * log_p, one_minus_p - p * log_p
    has_mass = one_minus_p > 0.0
    log2_omp = tl.log2(tl.where(has_mass, one_minus_p, 1.0))
    w = tl.where(has_mass, tl.exp2(gamma * log2_omp), 0.0)
    # f'(L) = (1-p)^gamma - gamma (1-p)^(gamma-1) p L
    tail = tl.where(has_mass & (p > 0.0), gamma * tl.exp2((gamma - 1.0) * log2_omp) * p * log_p, 0.0)
    return p, w * log_p, w - tail


@triton.jit
def positive_update(qk, pos, inv_t, c1, lse, gamma, p0, p1, p2, LOSS: tl.constexpr,
                    GAMMA_ZERO: tl.constexpr, GAMMA_ONE: tl.constexpr):
    """Fold one tile's positives into the positive state; ``lse [BM, 1]``: focal's finished
    dense statistic (natural units)."""
    if LOSS == SUPCON:
        return p0 + tl.sum(tl.where(pos, qk, 0.0), 1), p1, p2
    elif LOSS == SCHANE:
        m = tl.maximum(p0, tl.max(tl.where(pos, qk, float("-inf")), 1))
        e = tl.where(pos, tl.exp2(qk * c1 - (c1 * _shift(m))[:, None]), 0.0)
        return m, p1 * _rescale(p0, m, c1) + tl.sum(e, 1), p2
    else:
        log_p = tl.where(pos, qk * inv_t - lse, 0.0)
        _, f, fprime = focal_terms(log_p, gamma, GAMMA_ZERO, GAMMA_ONE)
        return p0 + tl.sum(tl.where(pos, f, 0.0), 1), p1 + tl.sum(tl.where(pos, fprime, 0.0), 1), p2


@triton.jit
def positive_finish(p0, p1, inv_t, c1, LOSS: tl.constexpr):
    """The positive statistics in natural units: ``(slot 0, slot 1)``."""
    if LOSS == SUPCON:
        return p0 * inv_t, p1
    elif LOSS == SCHANE:
        return (c1 * _shift(p0) + tl.log2(p1)) * LN2, p1
    return p0, p1


@triton.jit
def dense_grad(qk, c1, beta, q0, q1, q2, q3, LOSS: tl.constexpr, BETA_ZERO: tl.constexpr, BETA_ONE: tl.constexpr):
    """``G`` of the dense part (before masks) from parameters ``q0..q3`` (definition order).
    SCHaNe's value is for negatives only: the plain loop's tiles hold nothing else, the
    masked loop masks it."""
    u = qk * c1
    if LOSS == SUPCON:  # (lse_all, coef, pos_coef)
        return q1 * tl.exp2(u - q0 * LOG2E)
    elif LOSS == SCHANE:  # (lse_pos, lse_neg_hard, lse_neg_weight, coef)
        if BETA_ZERO:
            return q3 * tl.exp2(u - q1 * LOG2E)
        if BETA_ONE:
            # e_hard = h^2 and e_weight = h * 2^(lse_hard/2 - lse_weight) (log2 units)
            h = tl.exp2(u - q1 * (0.5 * LOG2E))
            k = tl.exp2(q1 * (0.5 * LOG2E) - q2 * LOG2E)
            return h * (2.0 * q3 * h - q3 * k)
        e_hard = tl.exp2((1.0 + beta) * u - q1 * LOG2E)
        e_weight = tl.exp2(beta * u - q2 * LOG2E)
        return q3 * ((1.0 + beta) * e_hard - beta * e_weight)
    else:  # (lse_all, coef, coef_fsum)
        return -q2 * tl.exp2(u - q0 * LOG2E)


@triton.jit
def positive_grad(qk, inv_t, c1, gamma, q0, q1, q2, q3, LOSS: tl.constexpr,
                  GAMMA_ZERO: tl.constexpr, GAMMA_ONE: tl.constexpr):
    """``G`` of the positive part (before masks)."""
    if LOSS == SUPCON:
        return -q2 + 0.0 * qk
    elif LOSS == SCHANE:
        return -q3 * tl.exp2(qk * c1 - q0 * LOG2E)
    else:
        log_p = tl.minimum(qk * inv_t - q0, 0.0)
        _, _, fprime = focal_terms(log_p, gamma, GAMMA_ZERO, GAMMA_ONE)
        return q1 * fprime


@triton.jit
def _log1p(x):
    """``log(1 + x)`` accurate for small ``x`` (the logarithm's argument rounded, then corrected)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _safe(lse, valid):
    return tl.where(valid, lse, float("inf"))


@triton.jit
def finalize_rows(d0, d1, p0, p1, n_pos, n_neg, w, scale, num_contrast, beta, LOSS: tl.constexpr,
                  BETA_ZERO: tl.constexpr):
    """The definitions' ``finalize`` on ``[BLOCK]`` rows: ``(loss, valid, q0, q1, q2, q3)`` from the
    dense slots ``d0, d1``, the positive slots ``p0, p1``, the set sizes and the anchor
    weights ``w``; ``scale`` is ``t / t_base`` (SupCon, focal)."""
    if LOSS == SUPCON:  # (lse_all), (sum_pos) -> (lse_all, coef, pos_coef)
        valid = n_pos > 0.0
        n = tl.maximum(n_pos, 1.0)
        loss = tl.where(valid, -scale * (p0 / n - d0), 0.0)
        coef = tl.where(valid, scale * w, 0.0)
        return loss, valid, _safe(d0, valid), coef, coef / n, coef * 0.0
    elif LOSS == SCHANE:  # (lse_neg_hard, lse_neg_weight), (lse_pos) -> (lse_pos, hard, weight, coef)
        valid = (n_pos > 0.0) & (n_neg > 0.0)
        log_n_neg = tl.log(tl.maximum(n_neg, 1.0))
        lw = d1
        if BETA_ZERO:
            lw = log_n_neg
        u = tl.where(valid, log_n_neg + tl.log(tl.maximum(n_pos, 1.0)) + d0 - lw - p0, 0.0)
        # softplus (threshold 20, as torch's) and sigmoid
        soft = tl.where(u > 20.0, u, tl.maximum(u, 0.0) + _log1p(tl.exp(-tl.abs(u))))
        loss = tl.where(valid, soft, 0.0)
        coef = tl.where(valid, w / (1.0 + tl.exp(-u)), 0.0)
        return loss, valid, _safe(p0, valid), _safe(d0, valid), _safe(lw, valid), coef
    else:  # (lse_all), (sum_f, sum_fprime) -> (lse_all, coef, coef_fsum)
        valid = n_pos > 0.0
        per_column = -scale / num_contrast
        loss = tl.where(valid, per_column * p0, 0.0)
        coef = tl.where(valid, per_column * w, 0.0)
        return loss, valid, _safe(d0, valid), coef, coef * p1, coef * 0.0
