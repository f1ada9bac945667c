"""``nn.Module`` wrappers of :mod:`fastcon.functional`; signatures mirror ``torch.nn`` losses.

Hyper-parameters are validated when the module is built, so a bad value fails at
construction rather than at the first training step.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as FC
from .backends import NAMES as BACKENDS
from .inputs import (
    CONTRAST_MODES,
    REDUCTIONS,
    check_choice,
    check_finite,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)
from .distributed import check_gather

__all__ = ["SupConLoss", "SCHaNeLoss", "CLCELoss", "FocalSupConLoss"]


class _ContrastiveLoss(nn.Module):
    def __init__(self, *, normalize: bool, reduction: str, backend: str, process_group=None, gather=False):
        super().__init__()
        self.normalize = bool(normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_gather(gather, process_group)
        self.process_group = process_group
        self.gather = gather


class SupConLoss(_ContrastiveLoss):
    """Supervised contrastive loss; see :func:`fastcon.functional.supcon_loss`.

    Example::

        loss_fn = SupConLoss(temperature=0.1)
        loss = loss_fn(features, labels)  # features [B, V, D], labels [B]
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, contrast_mode: str = "all",
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 process_group=None, gather=False):
        super().__init__(normalize=normalize, reduction=reduction, backend=backend,
                         process_group=process_group, gather=gather)
        self.temperature = check_positive("temperature", temperature)
        self.base_temperature = check_positive("base_temperature", base_temperature)
        self.contrast_mode = check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)

    def forward(self, features: torch.Tensor, labels=None, *, ref_features=None, ref_labels=None):
        return FC.supcon_loss(
            features, labels, temperature=self.temperature, base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode, normalize=self.normalize, reduction=self.reduction,
            backend=self.backend, ref_features=ref_features, ref_labels=ref_labels,
            process_group=self.process_group, gather=self.gather,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"contrast_mode={self.contrast_mode!r}, reduction={self.reduction!r}, backend={self.backend!r}")


class SCHaNeLoss(_ContrastiveLoss):
    """SCHaNe loss (hard-negative weighted supervised contrast); see :func:`fastcon.functional.schane_loss`."""

    def __init__(self, temperature: float = 0.07, beta: float = 1.0, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto",
                 process_group=None, gather=False):
        super().__init__(normalize=normalize, reduction=reduction, backend=backend,
                         process_group=process_group, gather=gather)
        self.temperature = check_positive("temperature", temperature)
        self.beta = check_finite("beta", beta)

    def forward(self, features: torch.Tensor, labels=None, *, ref_features=None, ref_labels=None):
        return FC.schane_loss(
            features, labels, temperature=self.temperature, beta=self.beta, normalize=self.normalize,
            reduction=self.reduction, backend=self.backend, ref_features=ref_features, ref_labels=ref_labels,
            process_group=self.process_group, gather=self.gather,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, beta={self.beta}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class FocalSupConLoss(_ContrastiveLoss):
    """Core-tuning's focal supervised contrastive loss; see :func:`fastcon.functional.focal_supcon_loss`."""

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, gamma: float = 1.0,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 process_group=None, gather=False):
        super().__init__(normalize=normalize, reduction=reduction, backend=backend,
                         process_group=process_group, gather=gather)
        self.temperature = check_positive("temperature", temperature)
        self.base_temperature = check_positive("base_temperature", base_temperature)
        self.gamma = check_nonnegative("gamma", gamma)

    def forward(self, features: torch.Tensor, labels=None, *, ref_features=None, ref_labels=None):
        return FC.focal_supcon_loss(
            features, labels, temperature=self.temperature, base_temperature=self.base_temperature,
            gamma=self.gamma, normalize=self.normalize, reduction=self.reduction, backend=self.backend,
            ref_features=ref_features, ref_labels=ref_labels,
            process_group=self.process_group, gather=self.gather,
        )

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, gamma={self.gamma}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class CLCELoss(nn.Module):
    """CLCE: ``alpha * SCHaNe + (1 - alpha) * cross-entropy``; see :func:`fastcon.functional.clce_loss`."""

    def __init__(self, alpha: float = 0.5, temperature: float = 0.07, beta: float = 1.0, normalize: bool = True,
                 backend: str = "auto", process_group=None, gather=False):
        super().__init__()
        self.alpha = check_unit_interval("alpha", alpha)
        self.temperature = check_positive("temperature", temperature)
        self.beta = check_finite("beta", beta)
        self.normalize = bool(normalize)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_gather(gather, process_group)
        self.process_group = process_group
        self.gather = gather

    def forward(self, features: torch.Tensor, logits: torch.Tensor, labels, *, ref_features=None, ref_labels=None):
        return FC.clce_loss(
            features, logits, labels, alpha=self.alpha, temperature=self.temperature, beta=self.beta,
            normalize=self.normalize, backend=self.backend, ref_features=ref_features, ref_labels=ref_labels,
            process_group=self.process_group, gather=self.gather,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, beta={self.beta}, backend={self.backend!r}"
