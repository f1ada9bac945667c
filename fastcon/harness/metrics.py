"""Accuracy and embedding-quality metrics of the test set.

All embedding metrics are computed on L2-normalised backbone features (what the
classifier reads), on the held-out test images.

- ``alignment`` (Wang & Isola 2020, alpha = 2): mean ``||f(x') - f(x'')||^2`` over two
  independent augmentations of each test image. Lower is better (0..4).
- ``class_alignment``: the same over pairs of distinct test images of the same class,
  the supervised analogue.
- ``uniformity`` (Wang & Isola 2020, t = 2): ``log mean_{i<j} exp(-2 ||f_i - f_j||^2)``.
  Lower (more negative) is more uniform on the sphere; the minimum is about -4 in high
  dimensions.
- ``isotropy``: partition-function isotropy (Mu & Viswanath 2018, the measure behind
  LaCViT's isotropy claim): ``min_c Z(c) / max_c Z(c)`` with ``Z(c) = sum_i exp(c . f_i)``
  and ``c`` over the eigenvectors of ``F^T F`` taken with both signs (an eigenvector's
  sign is arbitrary). 1 is perfectly isotropic, near 0 is a narrow cone.
- ``effective_rank`` (Roy & Vetterli 2007): ``exp`` of the entropy of the normalised
  eigenvalues of the features' covariance; between 1 and D.

Pairwise metrics use at most ``max_rows`` test rows (a fixed subset), so they stay cheap
for large test sets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    return (F.normalize(z1, dim=1) - F.normalize(z2, dim=1)).pow(2).sum(dim=1).mean().item()


def class_alignment(z: torch.Tensor, labels: torch.Tensor) -> float:
    z = F.normalize(z, dim=1)
    total, pairs = 0.0, 0
    for c in labels.unique():
        members = z[labels == c]
        k = members.shape[0]
        if k < 2:
            continue
        # sum_{i != j} ||z_i - z_j||^2 = 2 k sum_i ||z_i||^2 - 2 ||sum_i z_i||^2, with ||z_i|| = 1
        total += 2 * k * k - 2 * members.sum(dim=0).pow(2).sum().item()
        pairs += k * (k - 1)
    return total / pairs if pairs else float("nan")


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    z = F.normalize(z.double(), dim=1)
    sq = torch.pdist(z).pow(2)
    return (torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())).item()


def isotropy(z: torch.Tensor) -> float:
    z = F.normalize(z.double(), dim=1)
    _, vectors = torch.linalg.eigh(z.T @ z)
    directions = torch.cat([vectors, -vectors], dim=1)          # [D, 2D]
    log_partition = torch.logsumexp(z @ directions, dim=0)      # log Z(c) per direction
    return math.exp((log_partition.min() - log_partition.max()).item())


def effective_rank(z: torch.Tensor) -> float:
    z = F.normalize(z.double(), dim=1)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(z.T)).clamp_min(0)
    p = eigenvalues / eigenvalues.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return math.exp(entropy.item())


def embedding_metrics(features: torch.Tensor, labels: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor,
                      *, max_rows: int = 2048) -> dict:
    features, view1, view2 = features.float().cpu(), view1.float().cpu(), view2.float().cpu()
    labels = labels.cpu()
    if features.shape[0] > max_rows:
        keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]
        features, labels, view1, view2 = features[keep], labels[keep], view1[keep], view2[keep]
    return {
        "alignment": alignment(view1, view2),
        "class_alignment": class_alignment(features, labels),
        "uniformity": uniformity(features),
        "isotropy": isotropy(features),
        "effective_rank": effective_rank(features),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
