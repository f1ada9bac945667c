"""One training objective per ``--loss``.

A recipe has two parts, because under DDP everything that touches parameters must run
inside the wrapped module's ``forward``:

- ``heads(net, features, labels)``: runs inside ``Network.forward`` on the backbone's
  features of both views (rows ``[view 1 of the batch; view 2 of the batch]``) and returns
  what the loss needs (logits, projections, mixed rows);
- ``loss(outputs, labels)``: the scalar objective.

Every contrastive loss is a fastcon module (``backend="auto"``), built with
:func:`loss_kwargs`, which adds ``gather=True`` under multi-process training so that every
rank's anchors contrast against the rows of all ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcon

from ..mining import hard_pairs

LOSSES = ("ce", "supcon", "schane", "clce", "core")


def loss_kwargs(world_size: int) -> dict:
    """Keyword arguments of every contrastive loss module besides its hyper-parameters."""
    kwargs = {"backend": "auto"}
    if world_size > 1:
        kwargs["gather"] = True
    return kwargs


def by_view(rows: torch.Tensor, views: int = 2) -> torch.Tensor:
    """``[V*B, D]`` rows (all of view 0 first) -> ``[B, V, D]``, fastcon's view-major layout."""
    return rows.view(views, -1, rows.shape[-1]).transpose(0, 1)


class Recipe:
    name = ""
    two_stage = False  # LaCViT: contrastive stage, then a linear classifier on frozen features
    chunkable = True  # heads act on each row alone, so --chunk-size (gradient caching) applies

    def __init__(self, args, *, num_classes: int, world_size: int = 1, rank: int = 0):
        self.args = args
        self.num_classes = num_classes
        self.loss_options = loss_kwargs(world_size)
        self.rank = rank

    def heads(self, net, features: torch.Tensor, labels: torch.Tensor) -> dict:
        raise NotImplementedError

    def loss(self, out: dict, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(Recipe):
    """Plain fine-tuning: cross-entropy on both views."""
    name = "ce"

    def heads(self, net, features, labels):
        return {"logits": net.classifier(features)}

    def loss(self, out, labels):
        return F.cross_entropy(out["logits"], labels.repeat(2))


class SupCon(Recipe):
    """LaCViT stage 1: SupCon on the projection head's outputs of the two views."""
    name = "supcon"
    two_stage = True

    def __init__(self, args, **kw):
        super().__init__(args, **kw)
        self.contrastive = fastcon.SupConLoss(temperature=args.temperature,
                                              base_temperature=args.base_temperature, **self.loss_options)

    def heads(self, net, features, labels):
        return {"projections": net.projector(features)}

    def loss(self, out, labels):
        return self.contrastive(by_view(out["projections"]), labels)


class SCHaNe(Recipe):
    """``alpha * SCHaNe + (1 - alpha) * CE`` on both views, from the two fastcon pieces."""
    name = "schane"

    def __init__(self, args, **kw):
        super().__init__(args, **kw)
        self.alpha = args.alpha
        self.contrastive = fastcon.SCHaNeLoss(temperature=args.temperature, beta=args.beta, **self.loss_options)

    def heads(self, net, features, labels):
        return {"logits": net.classifier(features), "projections": net.projector(features)}

    def loss(self, out, labels):
        contrastive = self.contrastive(by_view(out["projections"]), labels)
        return self.alpha * contrastive + (1 - self.alpha) * F.cross_entropy(out["logits"], labels.repeat(2))


class CLCE(SCHaNe):
    """The same objective through fastcon's single ``CLCELoss``."""
    name = "clce"

    def __init__(self, args, **kw):
        Recipe.__init__(self, args, **kw)
        self.contrastive = fastcon.CLCELoss(alpha=args.alpha, temperature=args.temperature, beta=args.beta,
                                            **self.loss_options)

    def loss(self, out, labels):
        return self.contrastive(by_view(out["projections"]), by_view(out["logits"]), labels)


class CoreTuning(Recipe):
    """Core-tuning (Zhang et al. 2021): mixup of hard pairs, soft-label CE, focal SupCon.

    From a detached copy of the backbone features ``f`` (both views, ``R`` rows):
    hard negatives ``(1-lam) f_i + lam f_pi(i)`` (random permutation, ``lam ~ Beta(a, a)``
    clipped below at 0.8) and hard positives ``lam f_hp(i) + (1-lam) f_hn(i)`` (mined
    blockwise by :func:`fastcon.mining.hard_pairs`). The classifier sees all ``3R`` rows
    with mixed soft labels; the contrastor (projection head) sees them too, the mixed rows
    with labels of their own so that they only act as negatives. Total ``CE + eta * focal``.
    """
    name = "core"
    chunkable = False  # hard-pair mining and mixup need every row of the batch at once

    def __init__(self, args, **kw):
        super().__init__(args, **kw)
        self.eta = args.eta
        self.mixup = torch.distributions.Beta(args.mix_alpha, args.mix_alpha)
        self.contrastive = fastcon.FocalSupConLoss(temperature=args.temperature, base_temperature=args.base_temperature,
                                                   gamma=args.gamma, **self.loss_options)

    def heads(self, net, features, labels):
        labels = labels.repeat(2)
        rows = features.shape[0]
        onehot = F.one_hot(labels, self.num_classes).to(features.dtype)
        f = features.detach()
        # hard negatives: mixtures with a random other sample, dominated by that sample
        perm = torch.randperm(rows, device=f.device)
        lam = max(self.mixup.sample().item(), 0.8)
        negatives = (1 - lam) * f + lam * f[perm]
        negative_targets = (1 - lam) * onehot + lam * onehot[perm]
        # hard positives: the least similar same-class sample mixed with the most similar other-class one
        hardest_negative, hardest_positive = hard_pairs(f, labels)
        lam = self.mixup.sample().item()
        positives = lam * f[hardest_positive] + (1 - lam) * f[hardest_negative]
        positive_targets = lam * onehot[hardest_positive] + (1 - lam) * onehot[hardest_negative]
        all_rows = torch.cat([features, negatives, positives])
        return {
            "logits": net.classifier(all_rows),
            "projections": net.projector(all_rows),
            "targets": torch.cat([onehot, negative_targets, positive_targets]),
        }

    def loss(self, out, labels):
        logits, projections = out["logits"], out["projections"]
        labels = labels.repeat(2)
        rows = labels.shape[0]
        ce = -(out["targets"] * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        # labels >= num_classes, unique across rows and ranks: a mixed row has no positive
        mixed = self.num_classes + self.rank * 2 * rows + torch.arange(2 * rows, device=labels.device)
        focal = self.contrastive(projections, torch.cat([labels, mixed]))
        return ce + self.eta * focal


RECIPES = {r.name: r for r in (CrossEntropy, SupCon, SCHaNe, CLCE, CoreTuning)}


def make_recipe(args, **kw) -> Recipe:
    return RECIPES[args.loss](args, **kw)
