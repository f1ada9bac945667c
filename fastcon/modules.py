"""``nn.Module`` wrappers of :mod:`fastcon.functional`; signatures mirror ``torch.nn`` losses.

Hyper-parameters are validated when the module is built, so a bad value fails at
construction rather than at the first training step: a module holds its loss's definition
(:mod:`fastcon.losses`), which checks them, and setting one later
(``loss_fn.temperature = 0.1``) builds a new definition, checked the same way.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import functional as FC
from .backends import NAMES as BACKENDS
from .distributed import check_gather
from .inputs import CONTRAST_MODES, REDUCTIONS, check_choice, check_unit_interval
from .losses import FocalSupCon, LossDefinition, SCHaNe, SupCon

__all__ = ["SupConLoss", "SCHaNeLoss", "CLCELoss", "FocalSupConLoss"]


class HyperParameter:
    """A module attribute that is one of its loss definition's hyper-parameters: reading it
    reads the definition, setting it builds a new definition (so the new value is checked)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, module, owner=None):
        return self if module is None else getattr(module.definition, self.name)

    def __set__(self, module, value):
        module.definition = dataclasses.replace(module.definition, **{self.name: value})


class _LossModule(nn.Module):
    """A loss's definition (built, so checked, once) and the options every loss takes."""

    temperature = HyperParameter()
    _repr_options = ("backend",)  # after the hyper-parameters in ``repr``

    def __init__(self, definition: LossDefinition, *, normalize: bool, backend: str, process_group, gather):
        super().__init__()
        self.definition = definition
        self.normalize = bool(normalize)
        self.backend = check_choice("backend", backend, BACKENDS)
        check_gather(gather, process_group)
        self.process_group = process_group
        self.gather = gather

    def _options(self, ref_features, ref_labels) -> dict:
        """The functional loss's keyword arguments other than the hyper-parameters."""
        return dict(normalize=self.normalize, backend=self.backend, ref_features=ref_features, ref_labels=ref_labels,
                    process_group=self.process_group, gather=self.gather)

    def extra_repr(self) -> str:
        hyper = [f"{f.name}={getattr(self.definition, f.name)}" for f in dataclasses.fields(self.definition)]
        return ", ".join(hyper + [f"{name}={getattr(self, name)!r}" for name in self._repr_options])


class _ContrastiveLoss(_LossModule):
    """A loss of :mod:`fastcon.losses`: :func:`fastcon.functional.contrastive_loss` of the definition."""

    _repr_options = ("reduction", "backend")

    def __init__(self, definition: LossDefinition, *, reduction: str, **options):
        super().__init__(definition, **options)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def _options(self, ref_features, ref_labels) -> dict:
        return dict(super()._options(ref_features, ref_labels), reduction=self.reduction)

    def forward(self, features: torch.Tensor, labels=None, *, ref_features=None, ref_labels=None):
        return FC.contrastive_loss(features, labels, definition=self.definition,
                                   **self._options(ref_features, ref_labels))


class SupConLoss(_ContrastiveLoss):
    """Supervised contrastive loss; see :func:`fastcon.functional.supcon_loss`.

    Example::

        loss_fn = SupConLoss(temperature=0.1)
        loss = loss_fn(features, labels)  # features [B, V, D], labels [B]
    """

    base_temperature = HyperParameter()
    _repr_options = ("contrast_mode", "reduction", "backend")

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, contrast_mode: str = "all",
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 process_group=None, gather=False):
        super().__init__(SupCon(temperature, base_temperature), normalize=normalize, reduction=reduction,
                         backend=backend, process_group=process_group, gather=gather)
        self.contrast_mode = check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)

    def _options(self, ref_features, ref_labels) -> dict:
        return dict(super()._options(ref_features, ref_labels), contrast_mode=self.contrast_mode)


class SCHaNeLoss(_ContrastiveLoss):
    """SCHaNe loss (hard-negative weighted supervised contrast); see :func:`fastcon.functional.schane_loss`."""

    beta = HyperParameter()

    def __init__(self, temperature: float = 0.07, beta: float = 1.0, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto",
                 process_group=None, gather=False):
        super().__init__(SCHaNe(temperature, beta), normalize=normalize, reduction=reduction, backend=backend,
                         process_group=process_group, gather=gather)


class FocalSupConLoss(_ContrastiveLoss):
    """Core-tuning's focal supervised contrastive loss; see :func:`fastcon.functional.focal_supcon_loss`."""

    base_temperature = HyperParameter()
    gamma = HyperParameter()

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, gamma: float = 1.0,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 process_group=None, gather=False):
        super().__init__(FocalSupCon(temperature, base_temperature, gamma), normalize=normalize,
                         reduction=reduction, backend=backend, process_group=process_group, gather=gather)


class CLCELoss(_ContrastiveLoss):
    """CLCE: ``alpha * SCHaNe + (1 - alpha) * cross-entropy``; see :func:`fastcon.functional.clce_loss`
    (which says how ``reduction`` combines the two terms)."""

    beta = HyperParameter()

    def __init__(self, alpha: float = 0.5, temperature: float = 0.07, beta: float = 1.0, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", process_group=None, gather=False):
        super().__init__(SCHaNe(temperature, beta), normalize=normalize, reduction=reduction, backend=backend,
                         process_group=process_group, gather=gather)
        self.alpha = check_unit_interval("alpha", alpha)

    def forward(self, features: torch.Tensor, logits: torch.Tensor, labels, *, ref_features=None, ref_labels=None):
        return FC.clce_loss(features, logits, labels, alpha=self.alpha, temperature=self.temperature, beta=self.beta,
                            **self._options(ref_features, ref_labels))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"
