"""The contract between one loss's math and every backend.

A loss of docs/semantics.md is a sum over anchors of ``f(row statistics)``. Its definition
(:class:`LossDefinition`, one file per loss in this package) holds, in one place:

- its hyper-parameters (the dataclass fields, checked when it is built) and the dense form
  of ``f`` written like docs/semantics.md (:meth:`dense_rows`, used by the reference backend
  with autograd);
- the streaming form, split in two parts by the columns they read:

  * the **dense part** runs over every column of ``A(i)`` (or only ``N(i)``, when
    ``dense_over == "negatives"``): masked log-sum-exps and sums of one tile of
    similarities (:meth:`dense_tile`);
  * the **positive part** runs over ``P(i)`` only (:meth:`positive_tile`); it may read
    the finished dense statistics (focal SupCon needs the row log-sum-exp). Kernels
    run it over the columns of the anchor's own class only, which are few.

  Each statistic is a *slot* with a merge rule (:data:`LSE`: log-add-exp, :data:`SUM`:
  addition), so partial statistics of any split of the columns merge exactly
  (:meth:`merge`); :meth:`finalize` turns the statistics into the per-anchor loss, the
  validity mask and the *parameters* of the gradient; :meth:`dense_grad` and
  :meth:`positive_grad` give ``G_ij = w_i dl_i/ds_ij`` of one tile from them.

Tile conventions (Python): ``s`` is a ``[rows, cols]`` float tensor of ``z_i . c_j / t``;
``mask`` / ``pos`` are boolean tensors of the same shape selecting the part's columns
(never the anchor's own column). Statistics and parameters are ``[slots, rows]``
tensors whose row order is given by :attr:`dense_slots`, :attr:`positive_slots` and
:attr:`param_slots`; the Triton and C++ tile math read them in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Optional

import torch

from ..inputs import check_positive

LSE = "lse"  # a log-sum-exp over a subset of the row's columns: merged by log-add-exp
SUM = "sum"  # a sum over a subset of the row's columns: merged by addition
MERGE_CODES = {LSE: 0, SUM: 1}  # how the kernels receive a slot's merge rule


@dataclass(frozen=True)
class Counts:
    """Per-anchor set sizes, from the labels alone (no similarity needed)."""

    n_pos: torch.Tensor  # |P(i)|, float, [A]
    n_neg: torch.Tensor  # |N(i)|, float, [A]
    num_contrast: int  # K, the number of contrast rows (M in docs/semantics.md's focal SupCon)


@dataclass(frozen=True)
class RowTerms:
    """What :meth:`LossDefinition.finalize` returns."""

    loss: torch.Tensor  # [A], 0 at invalid anchors
    valid: torch.Tensor  # [A] bool
    params: torch.Tensor  # [len(param_slots), A]: what the gradient tiles read


def masked_lse(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of ``x`` over ``mask``; ``-inf`` for rows with an empty mask."""
    return torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum(1)


def keep(x: torch.Tensor, valid: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``x`` at valid anchors, ``fill`` elsewhere."""
    return torch.where(valid, x, fill)


def safe_lse(lse: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A log-sum-exp parameter for the gradient tiles: ``+inf`` at invalid anchors, so that
    ``exp(s - lse)`` is 0 there whatever ``s`` is (their coefficient is 0 too)."""
    return keep(lse, valid, math.inf)


def hyper_parameter(default: float, check: Callable[[str, float], float]):
    """A hyper-parameter field. ``check(name, value)`` (from :mod:`fastcon.inputs`) runs when a
    definition is built and gives the value stored, a float: the functional losses, the modules
    and the custom operators all build one, so this is the one place each value is checked."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class LossDefinition:
    """Base of the per-loss definitions (frozen dataclasses of hyper-parameters)."""

    temperature: float = hyper_parameter(0.07, check_positive)  # every loss divides z_i . z_j by it

    name: ClassVar[str]
    kernel_id: ClassVar[int]  # the loss's branch in the Triton and C++ tile math
    dense_over: ClassVar[str] = "all"  # the dense part's columns: "all" (A(i)) or "negatives" (N(i))
    dense_slots: ClassVar[tuple]  # ((name, LSE | SUM), ...)
    positive_slots: ClassVar[tuple]
    param_slots: ClassVar[tuple]  # names of the gradient parameters
    weight_params: ClassVar[tuple]  # those proportional to the anchor weights (G is linear in them)
    tile_temporaries: ClassVar[int]  # [rows, cols] float tensors the Python tile math holds at once
    positive_reads_dense: ClassVar[bool] = False  # the positive part needs the finished dense part

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    # --- dense form (the reference) ----------------------------------------------------
    def dense_rows(self, s, contrast, pos, neg):
        """``(loss [A], valid [A])`` from the full similarity matrix and docs/semantics.md's masks."""
        raise NotImplementedError

    # --- streaming form ----------------------------------------------------------------
    def dense_tile(self, s, mask):
        """Dense-part statistics ``[len(dense_slots), rows]`` of one tile."""
        raise NotImplementedError

    def positive_tile(self, s, pos, dense):
        """Positive-part statistics ``[len(positive_slots), rows]`` of one tile; ``dense`` holds
        the rows' finished dense statistics."""
        raise NotImplementedError

    def finalize(self, dense, positive, counts: Counts, weight) -> RowTerms:
        """Loss, validity and the gradient parameters of ``sum_i weight_i l_i``."""
        raise NotImplementedError

    def dense_grad(self, s, mask, params):
        """``G`` of the dense part on one tile (0 outside ``mask``); may overwrite ``s``."""
        raise NotImplementedError

    def positive_grad(self, s, pos, params):
        """``G`` of the positive part on one tile (0 outside ``pos``); leaves ``s`` unchanged."""
        raise NotImplementedError

    # --- generic -----------------------------------------------------------------------
    @property
    def hyper(self) -> tuple:
        """The hyper-parameters, in field order (how the kernels' host code passes them)."""
        return tuple(float(getattr(self, f.name)) for f in fields(self))

    def kernel_scalars(self) -> dict:
        """Scalars the kernels' tile math reads: ``beta`` and ``gamma`` (0 when unused) and the
        loss scale ``t / t_base`` (1 when unused)."""
        return {"beta": float(getattr(self, "beta", 0.0)), "gamma": float(getattr(self, "gamma", 0.0)),
                "scale": float(getattr(self, "scale", 1.0))}

    def dense_mask(self, contrast, pos, neg):
        return neg if self.dense_over == "negatives" else contrast

    @staticmethod
    def empty(slots, rows: int, dtype, device) -> torch.Tensor:
        """Statistics of an empty set of columns: the identity of each slot's merge."""
        out = torch.zeros(len(slots), rows, dtype=dtype, device=device)
        for k, (_, rule) in enumerate(slots):
            if rule == LSE:
                out[k] = -math.inf
        return out

    @staticmethod
    def merge(slots, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Statistics of the union of two disjoint sets of columns."""
        out = torch.empty_like(a)
        for k, (_, rule) in enumerate(slots):
            out[k] = torch.logaddexp(a[k], b[k]) if rule == LSE else a[k] + b[k]
        return out

    @staticmethod
    def merge_rules(slots) -> list:
        return [MERGE_CODES[rule] for _, rule in slots]


@dataclass(frozen=True)
class TemperatureScaled(LossDefinition):
    """SupContrast's convention, kept by Core-tuning's focal loss: the loss is multiplied by
    ``scale = t / t_base``."""

    base_temperature: float = hyper_parameter(0.07, check_positive)

    @property
    def scale(self) -> float:
        return self.temperature / self.base_temperature


def valid_coef(valid: torch.Tensor, weight: Optional[torch.Tensor], scale: float, like: torch.Tensor):
    """``scale * weight`` at valid anchors (weight 1 when None), 0 elsewhere, in ``like``'s dtype."""
    if weight is None:
        return valid.to(like.dtype).mul_(scale)
    return keep(scale * weight.to(like.dtype), valid)


def valid_weight(weight: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like) if weight is None else weight.to(like.dtype)
