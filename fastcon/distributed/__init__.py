"""Contrast across every rank of a ``torch.distributed`` process group.

With ``gather=True`` each rank's anchors are its own rows and its contrast set is the rows
of every rank: the other ranks' rows are all-gathered (autograd-aware) and passed to the
chosen backend as extra contrast rows (never anchors, never "self"); their gradients
return to their owners through the all-gather's backward. ``gather="ring"`` computes the
same values without gathering (:mod:`.ring`). Per-rank batch sizes may differ, and a rank
may have an empty batch (it contributes no anchors and no rows; every rank still calls the
loss and its backward, since they are collectives).

Loss scaling under DDP. Let ``L`` be the loss of one process on the concatenated batch
(all ranks' samples, rank 0's first). This rank returns ``world_size * L_r`` where ``L_r``
is its anchors' share of ``L`` (``sum_r L_r = L``; for ``"mean"`` every share divides by the
number of valid anchors of *all* ranks). DDP's averaging over ranks then leaves every
parameter with exactly the gradient of single-process training on the concatenated batch.
``reduction="none"`` returns this rank's per-anchor losses unscaled.
"""

from __future__ import annotations

import torch

from .. import backends
from ..backends.function import autocast_disabled, batch_loss
from ..inputs import Batch
from .collectives import (
    RankArguments,
    RankLayout,
    all_gather_rows,
    all_gather_rows_with_grad,
    all_reduce_sum,
    describe_ranks,
    group_rank_and_size,
)
from .ring import ring_row_losses


def check_gather(gather, process_group) -> None:
    """Validate ``gather`` / ``process_group`` as the public losses receive them."""
    if not any(gather is mode for mode in (False, True)) and gather != "ring":
        raise ValueError(f"gather must be False, True or 'ring', got {gather!r}")
    if gather is False and process_group is not None:
        raise ValueError("process_group is only used with gather=True; pass gather=True to contrast across ranks")


def _global_layout(features, batch: Batch, arguments: RankArguments, error, process_group):
    """Every rank's description and outcome of its checks (one all-gather; raises the same
    error on every rank if any rank failed or the ranks disagree), then the labels made global
    and the :class:`RankLayout`."""
    rank, world = group_rank_and_size(process_group)
    device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    cols = describe_ranks(features, batch, error, arguments, process_group, world, device)
    if not arguments.labelled:  # instance discrimination: the sample index must be unique across ranks
        batch.labels = batch.labels + sum(cols["samples"][:rank])
    all_labels = all_gather_rows(batch.labels, cols["rows"], process_group)
    return RankLayout(rank, world, cols["rows"], cols["samples"], all_labels)


def gathered_batch(batch: Batch, layout: RankLayout, process_group) -> Batch:
    """``batch`` with the other ranks' rows (and labels) joined as extra contrast rows before
    the user's ``ref_features`` (whose unlabelled rows stay last); their gradients flow back to
    their ranks."""
    all_rows = all_gather_rows_with_grad(batch.rows, layout.row_counts, process_group)
    start, end = layout.start, layout.end
    ref = torch.cat([all_rows[:start], all_rows[end:]])
    ref_y = torch.cat([layout.all_labels[:start], layout.all_labels[end:]])
    if batch.ref is not None:
        ref = torch.cat([ref, batch.ref.to(ref.dtype)])
        if batch.ref_labels is not None:
            ref_y = torch.cat([ref_y, batch.ref_labels])
    return Batch(batch.features, batch.labels, ref, ref_y, batch.num_anchors)


def distributed_loss(features, batch, definition, arguments: RankArguments, error=None, *, process_group=None):
    """``(loss, number of valid anchors of every rank)`` with every rank's rows in the contrast
    set; see the module docstring for the scaling of the returned value under DDP.

    ``batch`` and ``definition`` are this rank's checked call (:func:`fastcon.inputs.check_batch`
    with ``allow_empty=True``), None where its checks raised ``error``: the first collective
    tells every rank, and every rank raises the same error. ``arguments`` are what the ranks
    must pass alike.
    """
    layout = _global_layout(features, batch, arguments, error, process_group)
    normalize, reduction = arguments.normalize, arguments.reduction
    if arguments.gather == "ring":
        backend = arguments.backend if arguments.backend != "reference" else "blockwise"
        _, engine = backends.engine_for(backend, batch.features.device, batch.features.dtype)
        with autocast_disabled(batch.features.device):
            row_loss, valid = ring_row_losses(batch, layout, definition, normalize, engine, process_group)
        if reduction == "none":
            return row_loss, valid
        total = row_loss.sum()
    else:
        batch = gathered_batch(batch, layout, process_group)
        if reduction == "none":
            return batch_loss(batch, definition, normalize, "none", arguments.backend)
        total, valid = batch_loss(batch, definition, normalize, "sum", arguments.backend)
    n_valid = all_reduce_sum(valid.sum(), process_group)
    if reduction == "sum":
        return total * layout.world, n_valid
    return total * layout.world / n_valid.clamp(min=1).to(total.dtype), n_valid


def rescale_local_sum(local_sum: torch.Tensor, num_rows: int, process_group=None) -> torch.Tensor:
    """``world_size`` times this rank's share of the mean over every rank's rows, from the sum
    over its own ``num_rows`` rows (the DDP scaling of the contrastive losses; a rank with no
    rows contributes 0)."""
    info = group_rank_and_size(process_group)
    if info is None or info[1] == 1:
        return local_sum / max(num_rows, 1)
    count = torch.tensor(float(num_rows), dtype=torch.float64, device=local_sum.device)
    total = float(all_reduce_sum(count, process_group))
    return local_sum * (info[1] / max(total, 1.0))


def global_loss_value(loss: torch.Tensor, process_group=None) -> torch.Tensor:
    """The loss ``L`` of the whole batch (every rank's rows), for logging, from this rank's
    ``gather=True`` loss.

    A rank's loss is ``world_size * L_r`` (its share of ``L``, scaled for DDP's averaging of
    gradients), so logging it alone misleads; this returns ``sum_r world_size * L_r /
    world_size = L``, the same on every rank: the mean of ``loss`` over the ranks of
    ``process_group``. Works for ``reduction="mean"`` and ``"sum"`` and for the loss that
    :meth:`fastcon.GradCache.step` returns. A collective: every rank must call it. Without an
    initialised group, or with one process, it is ``loss`` itself. Returns a detached scalar.
    """
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss must be a scalar tensor (reduction='mean' or 'sum'), got {shape}")
    info = group_rank_and_size(process_group)
    if info is None or info[1] == 1:
        return loss.detach()
    return all_reduce_sum(loss, process_group) / info[1]


__all__ = ["check_gather", "global_loss_value", "distributed_loss", "rescale_local_sum", "all_gather_rows",
           "all_gather_rows_with_grad", "all_reduce_sum", "group_rank_and_size", "RankArguments", "RankLayout"]
