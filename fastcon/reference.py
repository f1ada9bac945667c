"""Dense reference backend: the definition every fast path is tested against.

It builds the full ``A x K`` similarity matrix and the label masks, exactly as
SPEC.md writes the losses, and lets autograd differentiate it. It is meant to be
read, not to be fast: memory is O(N^2).

Every masked log-sum-exp goes through :func:`masked_logsumexp`, which is safe on
empty sets (the published codes exponentiate masked entries after subtracting a
row max, which underflows at low temperature in half precision).
"""

from __future__ import annotations

import math

import torch

from ._inputs import Problem
from .spec import LossSpec


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp of ``x`` over ``mask``; ``-inf`` for rows with an empty mask.

    Empty rows are computed on zeros so that their (unused) gradient is not NaN.
    """
    has_any = mask.any(dim=1)
    safe = torch.where(has_any[:, None], x.masked_fill(~mask, -math.inf), torch.zeros_like(x))
    lse = torch.logsumexp(safe, dim=1)
    return torch.where(has_any, lse, torch.full_like(lse, -math.inf))


def similarity_and_masks(problem: Problem, temperature: float):
    """``s [A, K]``, and the masks ``A(i)`` (contrast), ``P(i)`` (positives), ``N(i)`` (negatives)."""
    z, a = problem.z, problem.num_anchors
    contrast = z if problem.ref is None else torch.cat([z, problem.ref], dim=0)
    y_contrast = problem.labels if problem.ref is None else torch.cat([problem.labels, problem.ref_labels])
    anchors, y_anchor = z[:a], problem.labels[:a]
    s = anchors @ contrast.T / temperature
    k = contrast.shape[0]
    not_self = torch.ones(a, k, dtype=torch.bool, device=z.device)
    not_self[torch.arange(a), torch.arange(a)] = False  # anchor i is contrast column i
    same = y_anchor[:, None] == y_contrast[None, :]
    return s, not_self, same & not_self, ~same


def supcon_rows(s, contrast, pos, spec: LossSpec):
    """l_i = -(t/t_base) * mean_{p in P(i)} [ s_ip - LSE_{a in A(i)} s_ia ]."""
    n_pos = pos.sum(1)
    lse_all = masked_logsumexp(s, contrast)
    sum_pos = torch.where(pos, s, torch.zeros_like(s)).sum(1)
    valid = n_pos > 0
    mean_log_prob_pos = (sum_pos - n_pos * lse_all) / n_pos.clamp(min=1)
    loss = -spec.scale * mean_log_prob_pos
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def schane_rows(s, contrast, pos, neg, spec: LossSpec):
    """l_i = softplus(log Ng_i - log pos_i), both in log space (SPEC.md, SCHaNe)."""
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    valid = (n_pos > 0) & (n_neg > 0)
    log_pos = masked_logsumexp(s, pos) - torch.log(n_pos.clamp(min=1).to(s.dtype))
    log_ng = (
        torch.log(n_neg.clamp(min=1).to(s.dtype))
        + masked_logsumexp((1 + spec.beta) * s, neg)
        - masked_logsumexp(spec.beta * s, neg)
    )
    u = torch.where(valid, log_ng - log_pos, torch.zeros_like(log_pos))
    loss = torch.nn.functional.softplus(u)
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def focal_rows(s, contrast, pos, spec: LossSpec):
    """l_i = -(t/t_base) / M * sum_{j in P(i)} (1 - p_ij)^gamma log p_ij, p = softmax over A(i)."""
    n_pos = pos.sum(1)
    valid = n_pos > 0
    lse_all = masked_logsumexp(s, contrast)
    log_p = torch.where(contrast, s - lse_all[:, None], torch.zeros_like(s))
    one_minus_p = -torch.expm1(log_p)
    if spec.gamma == 0:
        weight = torch.ones_like(s)
    else:
        weight = one_minus_p.clamp(min=0) ** spec.gamma
    terms = torch.where(pos, weight * log_p, torch.zeros_like(s))
    loss = -spec.scale * terms.sum(1) / s.shape[1]
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def row_losses(problem: Problem, spec: LossSpec):
    """Per-anchor losses ``[A]`` (0 at invalid anchors) and the validity mask ``[A]``."""
    s, contrast, pos, neg = similarity_and_masks(problem, spec.temperature)
    if spec.kind == "supcon":
        return supcon_rows(s, contrast, pos, spec)
    if spec.kind == "schane":
        return schane_rows(s, contrast, pos, neg, spec)
    if spec.kind == "focal":
        return focal_rows(s, contrast, pos, spec)
    raise ValueError(f"unknown loss kind {spec.kind!r}")


def reduce_rows(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """SPEC.md reductions: mean over valid anchors, sum, or the per-anchor vector."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(loss.dtype)


def contrastive_loss(problem: Problem, spec: LossSpec, reduction: str) -> torch.Tensor:
    loss, valid = row_losses(problem, spec)
    return reduce_rows(loss, valid, reduction)
