"""Contrast across every rank of a ``torch.distributed`` process group.

With ``gather=True`` each rank's anchors are its own rows and its contrast set is
the rows of every rank. The rows are L2-normalised locally, then gathered by an
autograd-aware all-gather. The local rows stay the engine's ``z`` (so anchor i is
still contrast column i) and the other ranks' rows join as extra contrast rows
(the ``ref`` path: never anchors, never self). Their gradients come back through
the all-gather's backward, which sums every rank's contribution to each row onto
the rank that owns it. Uneven per-rank batch sizes are handled exactly (sizes are
all-gathered, rows are padded to the largest rank, and the padding is dropped).

Loss scaling under DDP. Let ``L`` be the loss of one process on the concatenated
batch (all ranks' samples, rank 0's first). This rank returns
``world_size * L_r`` where ``L_r`` is its anchors' share of ``L`` (``sum_r L_r = L``;
for ``"mean"`` every share divides by the number of valid anchors of *all* ranks).
Backpropagating it gives each rank's inputs ``world_size`` times their gradient
under ``L``, and DDP's averaging over ranks then leaves every parameter with
exactly the gradient of single-process training on the concatenated batch. The
returned values averaged over ranks equal ``L``; with balanced batches each is
close to the loss of the rank's own anchors. ``reduction="none"`` returns this
rank's per-anchor losses unscaled (exactly the single-process values); multiply
whatever you reduce them to by ``world_size`` under DDP.

``gather="ring"`` is reserved for a mode that streams contrast blocks around the
ring of ranks instead of gathering them; it is not implemented.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from . import reference
from ._function import ContrastiveFunction, get_engine, resolve_backend
from ._inputs import prepare
from .spec import LossSpec

GATHER_MODES = (False, True, "ring")


def check_gather(gather, process_group) -> None:
    """Validate ``gather`` / ``process_group`` as the public losses receive them."""
    if not any(gather is mode for mode in (False, True)) and gather != "ring":
        raise ValueError(f"gather must be False, True or 'ring', got {gather!r}")
    if gather is False and process_group is not None:
        raise ValueError("process_group is only used with gather=True; pass gather=True to contrast across ranks")


def group_rank_and_size(process_group=None):
    """``(rank, world_size)`` in ``process_group``, or None when no process group is initialised.

    Without an initialised group the losses run as a world of one process, so the same
    training script works with and without ``torchrun``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group was given but torch.distributed is not initialised")
        return None
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], process_group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rank r holds ``sizes[r]`` rows) along dim 0, without autograd.

    Rows are padded to the largest rank so ranks may hold different numbers of rows.
    """
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=process_group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _AllGatherRows(torch.autograd.Function):
    """:func:`all_gather_rows` whose backward returns to each rank the sum, over all ranks,
    of the gradients of its own rows (an all-reduce of the padded gradient: gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, process_group):
        ctx.sizes, ctx.rank, ctx.process_group = sizes, rank, process_group
        return all_gather_rows(x.detach(), sizes, process_group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, ctx.rank
        padded = grad.new_zeros((len(sizes), max(sizes)) + tuple(grad.shape[1:]))
        for q, part in enumerate(torch.split(grad, list(sizes), dim=0)):
            padded[q, : sizes[q]] = part
        dist.all_reduce(padded, group=ctx.process_group)
        return padded[rank, : sizes[rank]], None, None, None


def all_gather_rows_with_grad(x: torch.Tensor, sizes: Sequence[int], process_group=None) -> torch.Tensor:
    """:func:`all_gather_rows` through which gradients flow back to the rank owning each row."""
    rank = dist.get_rank(process_group)
    return _AllGatherRows.apply(x, tuple(sizes), rank, process_group)


def all_reduce_sum(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum of ``x`` over ranks (a copy, outside autograd)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=process_group)
    return x


def _shapes_of_all_ranks(features: torch.Tensor, num_rows: int, num_samples: int, process_group, world: int):
    """``[world, 4]``: samples, flattened rows, views and feature size of every rank; checks they agree."""
    views = features.shape[1] if features.dim() == 3 else 0
    mine = torch.tensor([num_samples, num_rows, views, features.shape[-1], features.dim()],
                        dtype=torch.int64, device=features.device)
    shapes = all_gather_rows(mine[None], [1] * world, process_group).cpu()
    # every rank sees the same table, so every rank raises the same error (no rank is left waiting)
    if len(set(shapes[:, 4].tolist())) != 1:
        raise ValueError(f"features must have the same number of dimensions on every rank, got {shapes[:, 4].tolist()}")
    if len(set(shapes[:, 2].tolist())) != 1:
        raise ValueError(f"features [B, V, D] must have the same V on every rank, got {shapes[:, 2].tolist()}")
    if len(set(shapes[:, 3].tolist())) != 1:
        raise ValueError(f"features must have the same feature size D on every rank, got {shapes[:, 3].tolist()}")
    return shapes


def gathered_problem(features, labels, *, contrast_mode, normalize, ref_features, ref_labels, process_group):
    """The local :class:`~fastcon._inputs.Problem` with the other ranks' rows (and labels) joined
    as extra contrast rows before the user's ``ref_features``.

    Returns ``(problem, world_size)``; ``world_size`` is 1 without an initialised process group.
    """
    problem = prepare(features, labels, contrast_mode=contrast_mode, normalize=normalize,
                      ref_features=ref_features, ref_labels=ref_labels)
    info = group_rank_and_size(process_group)
    if info is None or info[1] == 1:
        return problem, 1
    rank, world = info
    num_samples = features.shape[0]
    shapes = _shapes_of_all_ranks(features, problem.z.shape[0], num_samples, process_group, world)
    if labels is None:
        # instance discrimination: the sample index must be unique across the global batch
        first_sample = int(shapes[:rank, 0].sum())
        problem.labels = problem.labels + first_sample
    row_counts = shapes[:, 1].tolist()
    all_rows = all_gather_rows_with_grad(problem.z, row_counts, process_group)
    all_labels = all_gather_rows(problem.labels, row_counts, process_group)
    start = sum(row_counts[:rank])
    end = start + row_counts[rank]
    other_rows = torch.cat([all_rows[:start], all_rows[end:]])
    other_labels = torch.cat([all_labels[:start], all_labels[end:]])
    ref, ref_y = other_rows, other_labels
    if problem.ref is not None:
        user_ref_y = problem.ref_labels
        if ref_labels is None:
            # unlabelled extra rows are negatives of every anchor of every rank
            user_ref_y = torch.full_like(user_ref_y, int(all_labels.max()) + 1)
        ref = torch.cat([ref, problem.ref])
        ref_y = torch.cat([ref_y, user_ref_y])
    problem.ref, problem.ref_labels = ref, ref_y
    return problem, world


def _row_losses(problem, spec: LossSpec, backend: str):
    """Per-anchor losses ``[A]`` (with autograd) and the validity mask of the local anchors."""
    name = resolve_backend(backend, problem.z.device)
    if name == "reference":
        return reference.row_losses(problem, spec)
    engine = get_engine(name, problem.z.device)
    return ContrastiveFunction.apply(problem.z, problem.ref, problem.labels, problem.ref_labels,
                                     problem.num_anchors, spec, "none", engine)


def _summed_row_loss(problem, spec: LossSpec, backend: str):
    """``(sum of the local per-anchor losses, number of valid local anchors)``.

    The engines compute the gradient of a sum in their forward pass, so this is cheaper
    than summing the ``"none"`` output.
    """
    name = resolve_backend(backend, problem.z.device)
    if name == "reference":
        loss, valid = reference.row_losses(problem, spec)
        return loss.sum(), valid.sum()
    engine = get_engine(name, problem.z.device)
    total, valid = ContrastiveFunction.apply(problem.z, problem.ref, problem.labels, problem.ref_labels,
                                             problem.num_anchors, spec, "sum", engine)
    return total, valid.sum()


def distributed_contrastive_loss(
    features: torch.Tensor,
    labels=None,
    *,
    spec: LossSpec,
    contrast_mode: str = "all",
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    ref_features=None,
    ref_labels=None,
    process_group=None,
    gather=True,
) -> torch.Tensor:
    """Any loss of SPEC.md with every rank's rows in the contrast set; see the module docstring
    for the scaling of the returned value under DDP."""
    if gather == "ring":
        raise NotImplementedError(
            "gather='ring' (streaming contrast blocks between ranks) is not implemented; "
            "use gather=True, which all-gathers the normalised features (O(world * N * D) memory) "
            "and keeps the similarity work blockwise"
        )
    problem, world = gathered_problem(
        features, labels, contrast_mode=contrast_mode, normalize=normalize,
        ref_features=ref_features, ref_labels=ref_labels, process_group=process_group,
    )
    if reduction == "none":
        return _row_losses(problem, spec, backend)[0]
    total, n_valid = _summed_row_loss(problem, spec, backend)
    if world > 1:
        n_valid = all_reduce_sum(n_valid, process_group)
    if reduction == "sum":
        return total * world
    return total * world / n_valid.clamp(min=1).to(total.dtype)


def rescale_local_mean(local_mean: torch.Tensor, num_rows: int, process_group=None) -> torch.Tensor:
    """Turn a rank's mean over its ``num_rows`` rows into ``world_size`` times its share of the
    mean over every rank's rows (the same DDP scaling as the contrastive losses; with equal
    batch sizes it is the local mean unchanged)."""
    info = group_rank_and_size(process_group)
    if info is None or info[1] == 1:
        return local_mean
    world = info[1]
    count = torch.tensor(float(num_rows), dtype=torch.float64, device=local_mean.device)
    total = all_reduce_sum(count, process_group)
    return local_mean * (num_rows * world / float(total))


__all__ = [
    "distributed_contrastive_loss",
    "all_gather_rows",
    "all_gather_rows_with_grad",
    "rescale_local_mean",
    "group_rank_and_size",
]
