"""SupCon (Khosla et al. 2020; HobbitLong/SupContrast ``losses.py``), as docs/semantics.md defines it.

    l_i = -(t / t_base) * (1/|P(i)|) * sum_{p in P(i)} [ s_ip - LSE_{a in A(i)} s_ia ]

Streaming form: the dense part is ``LSE_A(s)``; the positive part is ``sum_P s``.
The gradient of one tile is ``G_ij = c_i softmax_A(s)_ij - [j in P(i)] c_i / |P(i)|``
with ``c_i = w_i t / t_base``: the softmax is the dense part, the constant the positive one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LSE, SUM, RowTerms, TemperatureScaled, keep, masked_lse, masked_sum, safe_lse, valid_coef


@dataclass(frozen=True)
class SupCon(TemperatureScaled):
    name = "supcon"
    kernel_id = 0
    dense_slots = (("lse_all", LSE),)
    positive_slots = (("sum_pos", SUM),)
    tile_temporaries = 4  # [rows, cols] tensors the Python tile math holds at its peak
    weight_params = ("coef", "pos_coef")  # the parameters proportional to the anchor weights
    param_slots = ("lse_all", "coef", "pos_coef")

    def dense_rows(self, s, contrast, pos, neg):
        n_pos = pos.sum(1)
        valid = n_pos > 0
        mean_log_prob_pos = (masked_sum(s, pos) - n_pos * masked_lse(s, contrast)) / n_pos.clamp(min=1)
        return keep(-self.scale * mean_log_prob_pos, valid), valid

    def dense_tile(self, s, mask):
        return masked_lse(s, mask)[None]

    def positive_tile(self, s, pos, dense):
        return masked_sum(s, pos)[None]

    def finalize(self, dense, positive, counts, weight):
        lse, sum_pos = dense[0], positive[0]
        valid = counts.n_pos > 0
        n = counts.n_pos.clamp(min=1)
        loss = keep(-self.scale * (sum_pos / n - lse), valid)
        coef = valid_coef(valid, weight, self.scale, lse)
        return RowTerms(loss, valid, torch.stack([safe_lse(lse, valid), coef, coef / n]))

    def dense_grad(self, s, mask, params):
        lse, coef = params[0], params[1]
        return s.sub_(lse[:, None]).exp_().mul_(coef[:, None]).masked_fill_(~mask, 0.0)

    def positive_grad(self, s, pos, params):
        return torch.where(pos, -params[2][:, None], torch.zeros_like(s))
