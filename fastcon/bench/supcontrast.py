"""The published SupCon code's algorithm (HobbitLong/SupContrast ``losses.py``), for comparison.

SupContrast is not a package, so the benchmark carries its algorithm, step by step
as the published code computes it: the full ``[V*B, V*B]`` similarity matrix, a dense
float label mask tiled ``V x V`` times, a dense "not self" mask built by scatter, a
row max subtracted for stability, and the mean log-probability of the positives.
Its memory is what fastcon is compared against, so none of those dense tensors is
avoided here. Like the published code it expects normalised features (its models
normalise the projection head's output) and does not normalise them itself.
"""

from __future__ import annotations

import torch


def supcontrast_loss(features: torch.Tensor, labels=None, *, temperature: float = 0.07,
                     base_temperature: float = 0.07, contrast_mode: str = "all") -> torch.Tensor:
    """SupCon of ``features [B, V, D]`` (already normalised) the way SupContrast computes it."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, V, D], got shape {tuple(features.shape)}")
    batch, views = features.shape[:2]
    device = features.device
    if labels is None:
        label_mask = torch.eye(batch, dtype=torch.float32, device=device)
    else:
        column = labels.contiguous().view(-1, 1)
        label_mask = torch.eq(column, column.T).float().to(device)

    # view-major contrast rows: all view-0 rows, then all view-1 rows, ...
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchors, anchor_views = features[:, 0], 1
    elif contrast_mode == "all":
        anchors, anchor_views = contrast, views
    else:
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")

    logits = torch.matmul(anchors, contrast.T) / temperature
    row_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - row_max.detach()

    label_mask = label_mask.repeat(anchor_views, views)
    not_self = torch.scatter(
        torch.ones_like(label_mask), 1, torch.arange(batch * anchor_views, device=device).view(-1, 1), 0
    )
    positive_mask = label_mask * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))

    positive_count = positive_mask.sum(1)
    positive_count = torch.where(positive_count < 1e-6, torch.ones_like(positive_count), positive_count)
    mean_log_prob_pos = (positive_mask * log_prob).sum(1) / positive_count
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_views, batch).mean()
