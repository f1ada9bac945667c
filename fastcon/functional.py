"""Functional forms of fastcon's losses (``import fastcon.functional as FC``).

Every loss takes ``features`` ``[B, V, D]`` (V views of B samples, flattened
view-major) or ``[N, D]`` (one view per row, labels required), optional integer
``labels``, and keyword ``ref_features`` / ``ref_labels``: extra contrast-only rows
(a memory bank, a queue). The math is docs/semantics.md's. ``backend`` is ``"auto"``,
``"reference"`` (dense), ``"blockwise"``, ``"triton"`` or ``"native"`` (see
:mod:`fastcon.backends`).

With ``gather=True`` under an initialised ``torch.distributed`` process group (``process_group``,
default the world) each rank's anchors contrast against the rows of every rank, and the
returned loss is scaled for DDP's gradient averaging (see :mod:`fastcon.distributed`).

The loss comes back in float32 (float64 for float64 input), also under ``torch.autocast``;
gradients reach the inputs in their own dtype.

A ``"mean"`` loss without a valid anchor is 0.0 (docs/semantics.md). For CPU tensors it also
warns, once per process (the usual cause is a batch with one view per sample and all-distinct
labels); for GPU tensors it does not, since testing the count would make every step wait for
the device.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F

from . import backends
from .backends.function import autocast_disabled, batch_loss
from .distributed import RankArguments, check_gather, distributed_loss, group_rank_and_size, rescale_local_sum
from .inputs import REDUCTIONS, check_batch, check_choice, check_unit_interval
from .losses import FocalSupCon, LossDefinition, SCHaNe, SupCon

__all__ = ["supcon_loss", "schane_loss", "clce_loss", "focal_supcon_loss", "contrastive_loss"]


def contrastive_loss(
    features: torch.Tensor,
    labels=None,
    *,
    definition: LossDefinition,
    contrast_mode: str = "all",
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    ref_features=None,
    ref_labels=None,
    process_group=None,
    gather=False,
) -> torch.Tensor:
    """Any loss of :mod:`fastcon.losses` given as its definition; the public losses call this."""
    return _loss(lambda: definition, features, labels, contrast_mode=contrast_mode, normalize=normalize,
                 reduction=reduction, backend=backend, ref_features=ref_features, ref_labels=ref_labels,
                 process_group=process_group, gather=gather)


def _loss(build, features, labels, *, contrast_mode="all", normalize, reduction, backend, ref_features, ref_labels,
          process_group, gather, check_more=None, name=None) -> torch.Tensor:
    """The loss of the definition ``build()`` builds (which checks its hyper-parameters).

    ``check_more(batch)``, if given, checks the caller's own arguments and returns its
    hyper-parameters as ``(name, value)`` pairs (CLCE's ``alpha``); ``name`` is then the
    caller's loss (``"clce"``), which every rank must call alike. Every check runs before
    any computation; across ranks, before the first collective, whose metadata carries each
    rank's outcome and arguments so that every rank raises the same error.
    """
    check_gather(gather, process_group)
    info = group_rank_and_size(process_group) if gather is not False else None
    across_ranks = info is not None and info[1] > 1
    definition = batch = None
    extra = ()
    try:
        definition = build()
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, backends.NAMES)
        batch = check_batch(features, labels, contrast_mode=contrast_mode, ref_features=ref_features,
                            ref_labels=ref_labels, allow_empty=across_ranks)
        runs = backend if not (gather == "ring" and backend == "reference") else "blockwise"
        chosen = backends.resolve(runs, batch.features.device)  # an unavailable backend fails here, not mid-way
        extra = tuple(check_more(batch)) if check_more is not None else ()
        error = None
    except Exception as exc:  # noqa: BLE001 - raised below, on every rank alike
        if not across_ranks:
            raise
        error = exc
    if not across_ranks:
        loss, valid = batch_loss(batch, definition, bool(normalize), reduction, backend)
    else:
        arguments = RankArguments.of(definition, extra, name=name, gather=gather, reduction=reduction, backend=backend,
                                     contrast_mode=contrast_mode, normalize=normalize, labelled=labels is not None)
        loss, valid = distributed_loss(features, batch, definition, arguments, error, process_group=process_group)
    if reduction == "mean" and chosen.runs_on(torch.device("cpu")):
        _warn_if_no_valid_anchor(valid)
    return loss


_WARNED_NO_VALID_ANCHOR = False


def _warn_if_no_valid_anchor(valid: torch.Tensor) -> None:
    """Warn, once per process, that a "mean" loss had no valid anchor. Only for CPU tensors on
    a CPU backend: on a GPU, testing the count would wait for the device at every step."""
    global _WARNED_NO_VALID_ANCHOR
    if _WARNED_NO_VALID_ANCHOR or valid.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if int(valid.sum()) == 0:
        _WARNED_NO_VALID_ANCHOR = True
        warnings.warn(
            "fastcon: no anchor of this batch is valid (an anchor needs a positive, and for SCHaNe and "
            "CLCE a negative too), so the 'mean' loss is 0.0 and its gradient is zero. The usual "
            "cause is a batch with one view per sample and all-distinct labels: pass several views "
            "([B, V, D] with V >= 2) or sample batches with repeated labels. This warning is shown "
            "once per process.",
            UserWarning,
            stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel of the first caller outside fastcon and torch (a module's
    ``__call__``), so that the warning names the user's line."""
    inside = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2  # the caller of the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def supcon_loss(
    features: torch.Tensor,
    labels=None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    ref_features=None,
    ref_labels=None,
    process_group=None,
    gather=False,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), as in SupContrast's ``losses.py``.

    ``l_i = -(t / t_base) * mean_{p in P(i)} [ s_ip - LSE_{a in A(i)} s_ia ]``.
    Without labels a ``[B, V, D]`` input is SimCLR's instance discrimination.
    """
    return _loss(
        lambda: SupCon(temperature, base_temperature), features, labels, contrast_mode=contrast_mode,
        normalize=normalize, reduction=reduction, backend=backend, ref_features=ref_features, ref_labels=ref_labels,
        process_group=process_group, gather=gather,
    )


def schane_loss(
    features: torch.Tensor,
    labels=None,
    *,
    temperature: float = 0.07,
    beta: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    ref_features=None,
    ref_labels=None,
    process_group=None,
    gather=False,
) -> torch.Tensor:
    """SCHaNe (Long et al. 2023): supervised contrast with hard negatives weighted by
    ``softmax(beta * s)``; ``beta = 0`` is the reference code's "easy" estimator.

    ``l_i = softplus(log Ng_i - log pos_i)`` with positives averaged inside the log.
    """
    return _loss(
        lambda: SCHaNe(temperature, beta), features, labels, normalize=normalize, reduction=reduction,
        backend=backend, ref_features=ref_features, ref_labels=ref_labels,
        process_group=process_group, gather=gather,
    )


def focal_supcon_loss(
    features: torch.Tensor,
    labels=None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    gamma: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    ref_features=None,
    ref_labels=None,
    process_group=None,
    gather=False,
) -> torch.Tensor:
    """Focal supervised contrastive loss of Core-tuning (Zhang et al. 2021).

    ``l_i = -(t/t_base) / M * sum_{j in P(i)} (1 - p_ij)^gamma log p_ij`` where ``p`` is the
    softmax over ``A(i)`` and ``M`` the number of contrast rows (as the reference code divides).
    """
    return _loss(
        lambda: FocalSupCon(temperature, base_temperature, gamma), features, labels, normalize=normalize,
        reduction=reduction, backend=backend, ref_features=ref_features, ref_labels=ref_labels,
        process_group=process_group, gather=gather,
    )


def _check_logits(logits, features: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if features.dim() == 3:
        b, v = features.shape[:2]
        if logits.dim() == 3:
            if tuple(logits.shape[:2]) != (b, v):
                raise ValueError(
                    f"logits [B, V, C] must match features [B, V, D] in B and V: got logits "
                    f"{tuple(logits.shape)} for features {tuple(features.shape)}"
                )
        elif logits.dim() == 2:
            if logits.shape[0] != b:
                raise ValueError(
                    f"logits [B, C] must have B = {b} rows like features [B, V, D], got {tuple(logits.shape)}"
                )
        else:
            raise ValueError(f"logits must be [B, V, C] or [B, C], got shape {tuple(logits.shape)}")
    else:
        if logits.dim() != 2 or logits.shape[0] != features.shape[0]:
            raise ValueError(
                f"logits must be [N, C] with N = {features.shape[0]} rows like features [N, D], "
                f"got shape {tuple(logits.shape)}"
            )
    if logits.shape[-1] < 1:
        raise ValueError("logits must have at least one class column")
    return logits


def _check_class_labels(labels, num_classes: int) -> None:
    """Class indices in ``[0, C)``, checked for CPU tensors only: checking CUDA labels would make
    every step wait for the device (there, cross-entropy's own device-side assertion fires).
    Not inside ``torch.compile``, whose graphs cannot branch on tensor values."""
    if (not isinstance(labels, torch.Tensor) or labels.device.type != "cpu" or labels.numel() == 0
            or torch.compiler.is_compiling()):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}) for logits with C = {num_classes} columns, "
            f"got {low if low < 0 else high}"
        )


def clce_loss(
    features: torch.Tensor,
    logits: torch.Tensor,
    labels,
    *,
    alpha: float = 0.5,
    temperature: float = 0.07,
    beta: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    ref_features=None,
    ref_labels=None,
    process_group=None,
    gather=False,
) -> torch.Tensor:
    """CLCE (Long et al. 2024): ``alpha * SCHaNe + (1 - alpha) * CE``.

    ``logits`` is ``[B, V, C]`` (cross-entropy over every view, labels repeated per view),
    ``[B, C]`` or, for ``[N, D]`` features, ``[N, C]``. ``labels`` are required, class indices
    in ``[0, C)``: checked for CPU labels (outside ``torch.compile``), with a clear error; on
    CUDA an out-of-range label trips cross-entropy's device-side assertion (no label is ever
    ignored), since checking it would make every step wait for the device.

    The anchors are the rows of ``features`` flattened view-major (row ``v*B + b`` is view ``v``
    of sample ``b``), and anchor row ``i`` has the cross-entropy ``ce_i`` of its own logits row:
    ``logits[b, v]`` for ``[B, V, C]`` logits, ``logits[b]`` (the same for every view of sample
    ``b``) for ``[B, C]``, ``logits[n]`` for ``[N, C]``. With ``l_i`` SCHaNe's loss of anchor i
    (0 at an invalid anchor):

    - ``reduction="none"``: the ``[V*B]`` (or ``[N]``) vector ``alpha * l_i + (1 - alpha) * ce_i``;
    - ``"sum"``: the sum of that vector;
    - ``"mean"``: ``alpha`` times the mean of ``l_i`` over the valid anchors plus ``1 - alpha``
      times the mean of ``ce_i`` over all anchors (which is the mean over the logits rows).
    """
    def check_more(batch):
        a = check_unit_interval("alpha", alpha)
        if labels is None:
            raise ValueError("labels is required by clce_loss (its cross-entropy term needs classes)")
        _check_logits(logits, batch.features)
        _check_class_labels(labels if isinstance(labels, torch.Tensor) else batch.labels, logits.shape[-1])
        return (("alpha", a),)

    contrastive = _loss(
        lambda: SCHaNe(temperature, beta), features, labels, normalize=normalize, reduction=reduction,
        backend=backend, ref_features=ref_features, ref_labels=ref_labels, process_group=process_group,
        gather=gather, check_more=check_more, name="clce",
    )
    a = float(alpha)
    with autocast_disabled(logits.device):
        ce = _cross_entropy_rows(features, logits, labels)
    if reduction == "none":
        return a * contrastive + (1 - a) * ce.to(contrastive.dtype)
    if reduction == "sum":
        info = group_rank_and_size(process_group) if gather is not False else None
        ce = ce.sum() * (info[1] if info is not None else 1)  # scaled for DDP like the contrastive term
    elif gather is not False:
        ce = rescale_local_sum(ce.sum(), ce.shape[0], process_group)
    else:
        ce = ce.mean()
    return a * contrastive + (1 - a) * ce.to(contrastive.dtype)


def _cross_entropy_rows(features: torch.Tensor, logits: torch.Tensor, labels) -> torch.Tensor:
    """The cross-entropy of each anchor row (view-major, see :func:`clce_loss`), in float32
    (float64 for float64 logits)."""
    y = torch.as_tensor(labels, device=logits.device).to(torch.int64)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_logits = flat_logits if flat_logits.dtype == torch.float64 else flat_logits.float()
    if logits.dim() == 3:
        y = y[:, None].expand(logits.shape[0], logits.shape[1]).reshape(-1)  # [B, V] row-major like logits
    # no label is ignored (cross-entropy's default skips the label -100)
    ce = F.cross_entropy(flat_logits, y, reduction="none", ignore_index=torch.iinfo(torch.int64).min)
    if logits.dim() == 3:
        return ce.reshape(logits.shape[0], logits.shape[1]).T.reshape(-1)  # [B, V] -> view-major
    if features.dim() == 3:
        return ce.repeat(features.shape[1])  # [B] logits: every view of sample b has logits[b]
    return ce
