"""Hard pair mining for Core-tuning, computed blockwise (never an N x N matrix).

For every row ``i`` of ``features`` (cosine similarity):

- ``hardest_negative[i]`` (Core-tuning's ``hn(i)``): the most similar row of another class;
- ``hardest_positive[i]`` (``hp(i)``): the least similar other row of the same class.

The similarities are computed ``block_rows`` rows at a time against all rows, so memory
is ``O(block_rows * N)``. When ``i`` has no other row of its class, ``hp(i) = i``; when it
has no row of another class, ``hn(i) = i`` (mixing with itself leaves the row unchanged).
Ties go to the lowest index, as ``torch.argmax`` / ``argmin`` do.
(Core-tuning's reference code takes the arg-min over a zero-masked matrix, which finds a
zeroed entry rather than the least similar positive; this follows the paper's intent.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hard_pairs"]


@torch.no_grad()
def hard_pairs(features: torch.Tensor, labels: torch.Tensor, *, block_rows: int = 1024):
    """``(hardest_negative, hardest_positive)``: two int64 index vectors ``[N]``."""
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    labels = labels.reshape(-1)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have {features.shape[0]} entries, got {labels.shape[0]}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    hardest_negative = torch.empty(n, dtype=torch.long, device=z.device)
    hardest_positive = torch.empty(n, dtype=torch.long, device=z.device)
    columns = torch.arange(n, device=z.device)
    for start in range(0, n, block_rows):
        rows = columns[start:start + block_rows]
        sim = z[rows] @ z.T                                         # [b, N]: one block of rows
        same = labels[rows, None] == labels[None, :]
        is_self = rows[:, None] == columns[None, :]
        negative_sim = sim.masked_fill(same, float("-inf"))
        positive_sim = sim.masked_fill(~same | is_self, float("inf"))
        hn = negative_sim.argmax(dim=1)
        hp = positive_sim.argmin(dim=1)
        hardest_negative[rows] = torch.where((~same).any(dim=1), hn, rows)
        hardest_positive[rows] = torch.where((same & ~is_self).any(dim=1), hp, rows)
    return hardest_negative, hardest_positive
