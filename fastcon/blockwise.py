"""Blockwise PyTorch backend: never more than one block of similarities in memory.

Anchors are processed ``block_rows`` at a time. A block holds the anchors' full
rows of similarities ``s [bm, K]``, so each anchor's row statistics (masked
log-sum-exps, positive sums, counts) are exact within the block, and the
gradient ``G = dL/ds`` of the block is an element-wise function of ``s``, the
labels and those statistics. The feature gradients follow from two products
per block: ``d anchors = G @ contrast / t`` and ``d contrast += G^T @ anchors / t``.

The block size follows a memory budget (:func:`fastcon.set_block_memory`): with
K contrast rows a block uses about ``bm * K * bytes_per_element(loss)`` bytes.
This path runs on any device and is the CPU default.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .spec import LossSpec

_DEFAULT_BLOCK_MEMORY = int(float(os.environ.get("FASTCON_BLOCK_MEMORY_MB", "256")) * 2**20)
_block_memory = _DEFAULT_BLOCK_MEMORY

# Bytes per similarity element that one block needs at its peak (s, the label
# mask, and the temporaries of each loss's row math), per element size.
_TEMPORARIES = {"supcon": 3, "schane": 6, "focal": 5}


def set_block_memory(nbytes: int) -> None:
    """Set the memory budget (bytes) of one block of similarities in the blockwise backend."""
    global _block_memory
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    _block_memory = nbytes


def get_block_memory() -> int:
    """The memory budget (bytes) of one block of similarities in the blockwise backend."""
    return _block_memory


@contextmanager
def block_memory(nbytes: int):
    """Context manager that sets the blockwise memory budget and restores it on exit."""
    old = get_block_memory()
    set_block_memory(nbytes)
    try:
        yield
    finally:
        set_block_memory(old)


def block_rows(num_anchors: int, num_contrast: int, spec: LossSpec, dtype: torch.dtype) -> int:
    """How many anchor rows fit into one block under the memory budget."""
    elem = torch.finfo(dtype).bits // 8
    per_row = num_contrast * (elem * _TEMPORARIES[spec.kind] + 1)
    return int(max(1, min(num_anchors, _block_memory // max(per_row, 1))))


def _masked_lse(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of ``x`` over ``mask`` (-inf for empty rows); no autograd needed."""
    return torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=1)


def _zero_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


# --- per-loss row math -----------------------------------------------------------
# Each takes the block's similarities ``s [bm, K]`` with the self column already set
# to -inf, the label mask ``same [bm, K]`` (self column included), the positive
# count ``n_pos [bm]`` (self excluded), ``n_neg [bm]``, ``weight [bm]`` (the
# coefficient of each anchor's loss, or None when no gradient is wanted) and, for
# SupCon, ``sum_pos [bm]``, the sum of s over P(i). It returns
# the per-anchor losses, the validity mask, and G = weight_i * dl_i/ds_ij (or None).
# ``s`` may be overwritten.


def supcon_block(s, same, n_pos, n_neg, spec: LossSpec, weight, sum_pos):
    valid = n_pos > 0
    lse_all = torch.logsumexp(s, dim=1)
    n = n_pos.clamp(min=1).to(s.dtype)
    loss = _zero_invalid(-spec.scale * (sum_pos / n - lse_all), valid)
    if weight is None:
        return loss, valid, None
    coef = _zero_invalid(spec.scale * weight, valid)
    lse_safe = _zero_invalid(lse_all, valid)
    # G_ij = scale * (softmax_A(s)_ij - [j in P(i)] / |P(i)|); the self column has p = 0
    # and is removed from P by masking with finite s.
    g = s.sub_(lse_safe[:, None]).exp_()
    g.sub_(same * (1.0 / n)[:, None])  # the self column is zeroed by the caller
    g.mul_(coef[:, None])
    return loss, valid, g


def schane_block(s, same, n_pos, n_neg, spec: LossSpec, weight, sum_pos=None):
    beta = spec.beta
    valid = (n_pos > 0) & (n_neg > 0)
    is_self = torch.isinf(s)
    pos = same & ~is_self
    neg = ~same
    del is_self
    lse_pos = _masked_lse(s, pos)
    # scale first, then mask: a negative beta must not turn masked -inf into +inf
    lse_n1 = _masked_lse((1 + beta) * s, neg)
    if beta == 0:
        lse_nb = torch.log(n_neg.clamp(min=1).to(s.dtype))
    else:
        lse_nb = _masked_lse(beta * s, neg)
    log_np = torch.log(n_neg.clamp(min=1).to(s.dtype)) + torch.log(n_pos.clamp(min=1).to(s.dtype))
    u = _zero_invalid(log_np + lse_n1 - lse_nb - lse_pos, valid)
    loss = _zero_invalid(F.softplus(u), valid)
    if weight is None:
        return loss, valid, None
    coef = _zero_invalid(torch.sigmoid(u) * weight, valid)
    lse_pos, lse_n1, lse_nb = (_zero_invalid(x, valid)[:, None] for x in (lse_pos, lse_n1, lse_nb))
    # dl/ds: positives -softmax_P(s); negatives (1+beta) softmax_N((1+beta)s) - beta softmax_N(beta s)
    g_neg = torch.exp((1 + beta) * s - lse_n1).mul_(1 + beta)
    if beta != 0:
        g_neg.sub_(beta * torch.exp(beta * s - lse_nb))
    g = torch.where(neg, g_neg, torch.where(pos, -torch.exp(s - lse_pos), torch.zeros_like(s)))
    g.mul_(coef[:, None])
    return loss, valid, g


def focal_block(s, same, n_pos, n_neg, spec: LossSpec, weight, sum_pos=None):
    gamma = spec.gamma
    k = s.shape[1]
    valid = n_pos > 0
    is_self = torch.isinf(s)
    pos = same & ~is_self
    del is_self
    lse_all = _zero_invalid(torch.logsumexp(s, dim=1), valid)
    log_p = s.sub_(lse_all[:, None])  # -inf at the self column
    log_p_pos = torch.where(pos, log_p, torch.zeros_like(log_p))  # finite everywhere
    one_minus_p = -torch.expm1(log_p_pos)
    w = torch.ones_like(log_p_pos) if gamma == 0 else one_minus_p.clamp(min=0).pow(gamma)
    coef_loss = -spec.scale / k
    loss = _zero_invalid(coef_loss * torch.where(pos, w * log_p_pos, torch.zeros_like(w)).sum(1), valid)
    if weight is None:
        return loss, valid, None
    # f(L) = (1 - e^L)^gamma L;  f'(L) = (1-p)^gamma - gamma (1-p)^(gamma-1) p L
    p_pos = 1 - one_minus_p
    if gamma == 0:
        fprime = w
    else:
        tail = gamma * one_minus_p.clamp(min=torch.finfo(s.dtype).tiny).pow(gamma - 1) * p_pos * log_p_pos
        tail = torch.where(one_minus_p > 0, tail, torch.zeros_like(tail))
        fprime = w - tail
    fprime = torch.where(pos, fprime, torch.zeros_like(fprime))
    del w, one_minus_p, p_pos, log_p_pos
    f_sum = fprime.sum(1)
    p = log_p.exp_()  # 0 at the self column
    # G_ik = -scale/K * ( [k in P] f'(L_ik) - p_ik * sum_{j in P} f'(L_ij) )
    g = fprime.sub_(p * f_sum[:, None])
    coef = _zero_invalid(coef_loss * weight, valid)
    g.mul_(coef[:, None])
    return loss, valid, g


BLOCK_FUNCTIONS = {"supcon": supcon_block, "schane": schane_block, "focal": focal_block}


def _contrast(z, ref, labels, ref_labels):
    if ref is None:
        return z, labels
    return torch.cat([z, ref], dim=0), torch.cat([labels, ref_labels])


def sweep(z, ref, labels, ref_labels, num_anchors, spec: LossSpec, row_weight=None, want_grad=False,
          need_ref_grad=True):
    """One pass over anchor blocks.

    Returns ``(row_loss [A], valid [A], grad_z, grad_ref)``; the gradients are those of
    ``sum_i w_i l_i`` (``w`` = ``row_weight``, or 1) and are None unless ``want_grad``.
    """
    contrast, y_contrast = _contrast(z, ref, labels, ref_labels)
    a, k = num_anchors, contrast.shape[0]
    m = z.shape[0]
    inv_t = 1.0 / spec.temperature
    # Positive / negative counts per anchor from label counts: O(K), no N x N mask.
    uniq, inverse, counts = torch.unique(y_contrast, return_inverse=True, return_counts=True)
    n_same = counts[inverse[:a]]
    n_pos = n_same - 1  # the anchor itself is a contrast row with its own label
    n_neg = k - n_same
    row_loss = torch.empty(a, dtype=z.dtype, device=z.device)
    valid = torch.empty(a, dtype=torch.bool, device=z.device)
    grad_c = torch.zeros_like(contrast) if want_grad else None
    grad_a = torch.zeros(a, z.shape[1], dtype=z.dtype, device=z.device) if want_grad else None
    contrast_t = contrast * inv_t  # fold 1/t into one operand once
    block_fn = BLOCK_FUNCTIONS[spec.kind]
    bm = block_rows(a, k, spec, z.dtype)
    ones = torch.ones(a, dtype=z.dtype, device=z.device)
    sum_pos = None
    if spec.kind == "supcon":
        # sum_{p in P(i)} s_ip = z_i . (sum of class y_i's contrast rows - z_i) / t: O(K * D).
        class_sum = torch.zeros(uniq.shape[0], z.shape[1], dtype=z.dtype, device=z.device)
        # (an int32 index takes a much faster CPU kernel than int64 here)
        class_sum.index_add_(0, inverse.to(torch.int32), contrast_t)
        sum_pos = (z[:a] * (class_sum[inverse[:a]] - contrast_t[:a])).sum(1)
    for r0 in range(0, a, bm):
        r1 = min(a, r0 + bm)
        anchors = z[r0:r1]
        s = anchors @ contrast_t.T
        rows = torch.arange(r0, r1, device=z.device)
        s[rows - r0, rows] = -math.inf  # anchor i is contrast column i: exclude it from A(i)
        same = labels[r0:r1, None] == y_contrast[None, :]
        weight = None
        if want_grad:
            weight = ones[r0:r1] if row_weight is None else row_weight[r0:r1]
        loss, ok, g = block_fn(s, same, n_pos[r0:r1], n_neg[r0:r1], spec, weight,
                               None if sum_pos is None else sum_pos[r0:r1])
        row_loss[r0:r1] = loss
        valid[r0:r1] = ok
        if want_grad:
            g[rows - r0, rows] = 0.0
            grad_a[r0:r1] += g @ contrast_t
            if need_ref_grad or ref is None:
                grad_c += g.T @ (anchors * inv_t)
            else:
                grad_c[:m] += g[:, :m].T @ (anchors * inv_t)
        del s, same, g
    if not want_grad:
        return row_loss, valid, None, None
    grad_z = grad_c[:m]
    grad_z[:a] += grad_a
    grad_ref = grad_c[m:] if ref is not None else None
    return row_loss, valid, grad_z, grad_ref


class BlockwiseEngine:
    """Engine interface used by :class:`fastcon._function.ContrastiveFunction`."""

    name = "blockwise"

    def forward(self, z, ref, labels, ref_labels, num_anchors, spec, want_grad, need_ref_grad):
        row_loss, valid, gz, gr = sweep(z, ref, labels, ref_labels, num_anchors, spec,
                                        want_grad=want_grad, need_ref_grad=need_ref_grad)
        return row_loss, valid, (), gz, gr

    def backward(self, z, ref, labels, ref_labels, num_anchors, spec, saved, row_weight, need_ref_grad):
        _, _, gz, gr = sweep(z, ref, labels, ref_labels, num_anchors, spec, row_weight=row_weight,
                             want_grad=True, need_ref_grad=need_ref_grad)
        return gz, gr
