"""SCHaNe (Long et al. 2023; GLA-IR/SCHaNe ``CL_tools/losses.py``, estimator "hard").

    pos_i = (1/|P(i)|) sum_{p in P(i)} e^{s_ip}
    Ng_i  = |N(i)| sum_{k in N(i)} softmax_k(beta s_ik) e^{s_ik}
    l_i   = softplus(log Ng_i - log pos_i)

In log space ``log pos_i = LSE_P(s) - log|P|`` and
``log Ng_i = log|N| + LSE_N((1+beta) s) - LSE_N(beta s)``. The importance weights are not
detached. Streaming form: the dense part is the two LSEs over ``N(i)``, the positive part
``LSE_P(s)``. With ``u_i = log Ng_i - log pos_i`` and ``c_i = w_i sigmoid(u_i)``:
``G = -c_i softmax_P(s)`` on P and ``c_i [(1+b) softmax_N((1+b)s) - b softmax_N(b s)]`` on N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inputs import check_finite
from .base import LSE, LossDefinition, RowTerms, hyper_parameter, keep, masked_lse, safe_lse, valid_weight


@dataclass(frozen=True)
class SCHaNe(LossDefinition):
    beta: float = hyper_parameter(1.0, check_finite)

    name = "schane"
    kernel_id = 1
    dense_over = "negatives"
    dense_slots = (("lse_neg_hard", LSE), ("lse_neg_weight", LSE))  # LSE_N((1+beta)s), LSE_N(beta s)
    positive_slots = (("lse_pos", LSE),)
    tile_temporaries = 7  # [rows, cols] tensors the Python tile math holds at its peak
    weight_params = ("coef",)  # the parameters proportional to the anchor weights
    param_slots = ("lse_pos", "lse_neg_hard", "lse_neg_weight", "coef")

    def log_ratio(self, lse_pos, lse_neg_hard, lse_neg_weight, n_pos, n_neg):
        """``u = log Ng - log pos``; with ``beta = 0``, ``LSE_N(0) = log|N|`` exactly."""
        log_n_neg = torch.log(n_neg.clamp(min=1))
        if self.beta == 0:
            lse_neg_weight = log_n_neg
        return log_n_neg + torch.log(n_pos.clamp(min=1)) + lse_neg_hard - lse_neg_weight - lse_pos

    def dense_rows(self, s, contrast, pos, neg):
        n_pos, n_neg = pos.sum(1).to(s.dtype), neg.sum(1).to(s.dtype)
        valid = (n_pos > 0) & (n_neg > 0)
        # scale first, then mask: a negative beta must not turn a masked -inf into +inf
        u = self.log_ratio(masked_lse(s, pos), masked_lse((1 + self.beta) * s, neg),
                           masked_lse(self.beta * s, neg), n_pos, n_neg)
        return keep(F.softplus(keep(u, valid)), valid), valid

    def dense_tile(self, s, mask):
        return torch.stack([masked_lse((1 + self.beta) * s, mask), masked_lse(self.beta * s, mask)])

    def positive_tile(self, s, pos, dense):
        return masked_lse(s, pos)[None]

    def finalize(self, dense, positive, counts, weight):
        lse_hard, lse_weight, lse_pos = dense[0], dense[1], positive[0]
        valid = (counts.n_pos > 0) & (counts.n_neg > 0)
        u = keep(self.log_ratio(lse_pos, lse_hard, lse_weight, counts.n_pos, counts.n_neg), valid)
        loss = keep(F.softplus(u), valid)
        coef = keep(torch.sigmoid(u) * valid_weight(weight, u), valid)
        if self.beta == 0:
            lse_weight = torch.log(counts.n_neg.clamp(min=1))
        params = [safe_lse(lse_pos, valid), safe_lse(lse_hard, valid), safe_lse(lse_weight, valid), coef]
        return RowTerms(loss, valid, torch.stack(params))

    def dense_grad(self, s, mask, params):
        b = self.beta
        coef = params[3][:, None]
        g = torch.exp((1 + b) * s - params[1][:, None]).mul_((1 + b) * coef)
        if b != 0:
            g.sub_(torch.exp(b * s - params[2][:, None]).mul_(b * coef))
        return g.masked_fill_(~mask, 0.0)

    def positive_grad(self, s, pos, params):
        g = torch.exp(s - params[0][:, None]).mul_(-params[3][:, None])
        return g.masked_fill_(~pos, 0.0)
