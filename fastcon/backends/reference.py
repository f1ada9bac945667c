"""Dense reference backend: the definition every fast path is tested against.

It builds the full ``A x K`` similarity matrix and docs/semantics.md's masks and evaluates each
loss's dense form (:meth:`~fastcon.losses.base.LossDefinition.dense_rows`, written like
docs/semantics.md), differentiated by autograd, second derivatives included. It is
meant to be read, not to be fast: memory is O(N^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import Batch
from .common import compute_dtype, contrast_ranks


def _normalised(rows: torch.Tensor, normalize: bool) -> torch.Tensor:
    z = rows.to(compute_dtype(rows.dtype))
    return F.normalize(z, dim=1, eps=1e-12) if normalize else z


def similarity_and_masks(batch: Batch, temperature: float, normalize: bool):
    """``s [A, K]`` and the masks ``A(i)`` (contrast: every column but the anchor's own),
    ``P(i)`` (positives) and ``N(i)`` (negatives)."""
    z = _normalised(batch.rows, normalize)
    contrast = z
    if batch.ref is not None:
        contrast = torch.cat([z, _normalised(batch.ref, normalize).to(z.dtype)])
    y = contrast_ranks(batch.labels, batch.ref_labels, batch.num_unlabelled)  # equal ranks: equal labels
    a = batch.num_anchors
    s = z[:a] @ contrast.T / temperature
    not_self = torch.ones(a, contrast.shape[0], dtype=torch.bool, device=z.device)
    not_self[torch.arange(a), torch.arange(a)] = False  # anchor i is contrast column i
    same = y[:a, None] == y[None, :]
    return s, not_self, same & not_self, ~same


def row_losses(batch: Batch, definition, normalize: bool = True):
    """Per-anchor losses ``[A]`` (0 at invalid anchors) and the validity mask ``[A]``."""
    s, contrast, pos, neg = similarity_and_masks(batch, definition.temperature, normalize)
    return definition.dense_rows(s, contrast, pos, neg)


def reduce_rows(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """docs/semantics.md's reductions: mean over valid anchors, sum, or the per-anchor vector."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(loss.dtype)
