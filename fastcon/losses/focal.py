"""Focal SupCon of Core-tuning (Zhang et al. 2021; Vanint/Core-tuning ``focal_SupConLoss``).

    p_ij = softmax over j in A(i) of s_ij
    l_i  = -(t / t_base) * (1/M) * sum_{j in P(i)} (1 - p_ij)^gamma log p_ij

``M`` is the number of contrast rows. Streaming form: the dense part is ``LSE_A(s)``; the
positive part, which needs it, is ``sum_P f(L)`` and ``sum_P f'(L)`` with ``L = log p`` and
``f(L) = (1 - e^L)^gamma L``. With ``c_i = -(t/t_base) w_i / M``:
``G_ij = c_i [j in P(i)] f'(L_ij) - c_i p_ij sum_{k in P(i)} f'(L_ik)``
(the positive part and the dense part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import check_nonnegative
from .base import LSE, SUM, RowTerms, TemperatureScaled, hyper_parameter, keep, masked_lse, safe_lse, valid_coef


def focal_terms(log_p: torch.Tensor, gamma: float):
    """``(f(L), f'(L))`` for ``L = log p <= 0``: ``f = (1-p)^gamma L`` and
    ``f' = (1-p)^gamma - gamma (1-p)^(gamma-1) p L`` (its tail is 0 where p is 0 or 1)."""
    one_minus_p = -torch.expm1(log_p)  # no cancellation near p = 1
    if gamma == 0:
        return log_p, torch.ones_like(log_p)
    w = one_minus_p.clamp(min=0).pow(gamma)
    p = torch.exp(log_p)
    has_tail = (one_minus_p > 0) & (p > 0)
    tail = gamma * one_minus_p.clamp(min=torch.finfo(log_p.dtype).tiny).pow(gamma - 1) * p * log_p
    return w * log_p, w - torch.where(has_tail, tail, torch.zeros_like(tail))


@dataclass(frozen=True)
class FocalSupCon(TemperatureScaled):
    gamma: float = hyper_parameter(1.0, check_nonnegative)

    name = "focal"
    kernel_id = 2
    dense_slots = (("lse_all", LSE),)
    positive_slots = (("sum_f", SUM), ("sum_fprime", SUM))
    tile_temporaries = 7  # [rows, cols] tensors the Python tile math holds at its peak
    weight_params = ("coef", "coef_fsum")  # the parameters proportional to the anchor weights
    param_slots = ("lse_all", "coef", "coef_fsum")
    positive_reads_dense = True  # L = s - LSE_A(s) needs the whole row's log-sum-exp

    def dense_rows(self, s, contrast, pos, neg):
        valid = pos.sum(1) > 0
        log_p = torch.where(contrast, s - masked_lse(s, contrast)[:, None], torch.zeros_like(s))
        one_minus_p = -torch.expm1(log_p)
        weight = torch.ones_like(s) if self.gamma == 0 else one_minus_p.clamp(min=0) ** self.gamma
        terms = torch.where(pos, weight * log_p, torch.zeros_like(s))
        return keep(-self.scale * terms.sum(1) / s.shape[1], valid), valid

    def dense_tile(self, s, mask):
        return masked_lse(s, mask)[None]

    def positive_tile(self, s, pos, dense):
        lse = dense[0]
        # -inf only for an anchor without contrast rows (no positive either); a NaN or +inf
        # from non-finite input must reach the loss, as in the reference
        lse = torch.where(lse == -math.inf, torch.zeros_like(lse), lse)
        f, fprime = focal_terms(torch.where(pos, s - lse[:, None], torch.zeros_like(s)), self.gamma)
        zero = torch.zeros_like(s)
        return torch.stack([torch.where(pos, f, zero).sum(1), torch.where(pos, fprime, zero).sum(1)])

    def finalize(self, dense, positive, counts, weight):
        lse, sum_f, sum_fprime = dense[0], positive[0], positive[1]
        valid = counts.n_pos > 0
        per_column = -self.scale / counts.num_contrast  # the reference divides by every contrast row
        loss = keep(per_column * sum_f, valid)
        coef = valid_coef(valid, weight, per_column, lse)
        return RowTerms(loss, valid, torch.stack([safe_lse(lse, valid), coef, coef * sum_fprime]))

    def dense_grad(self, s, mask, params):
        lse, coef_fsum = params[0], params[2]
        return s.sub_(lse[:, None]).exp_().mul_(-coef_fsum[:, None]).masked_fill_(~mask, 0.0)

    def positive_grad(self, s, pos, params):
        lse = params[0]
        log_p = torch.where(pos, s - lse[:, None], torch.zeros_like(s))
        _, fprime = focal_terms(log_p, self.gamma)
        return torch.where(pos, fprime * params[1][:, None], torch.zeros_like(s))
