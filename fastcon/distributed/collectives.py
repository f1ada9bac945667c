"""Collectives and the rank layout of the distributed losses.

Every call starts with one small all-gather of each rank's batch description (sizes, views,
feature size, dtype, whether its input was valid), so that every rank sees the same table:
a mismatch raises the same error on every rank, an invalid input on one rank raises there
and a clear error on the others, and a rank with an empty batch takes part with no rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..inputs import FLOAT_DTYPES


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

    Rows are padded to the largest rank so ranks may hold different numbers of rows (0 included).
    """
    longest = max(max(sizes), 1)
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
        padded = grad.new_zeros((len(sizes), max(max(sizes), 1)) + tuple(grad.shape[1:]))
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


_DTYPE_CODES = {dt: i for i, dt in enumerate(FLOAT_DTYPES)}
_FIELDS = ("ok", "samples", "rows", "views", "dim", "ndim", "dtype", "labelled")


@dataclass
class RankLayout:
    """Where this rank's rows sit in the concatenated batch (rank order), and every rank's labels."""

    rank: int
    world: int
    row_counts: list  # flattened rows of every rank
    sample_counts: list  # samples of every rank
    all_labels: torch.Tensor  # [sum(row_counts)] labels of every rank's rows

    @property
    def start(self) -> int:
        return sum(self.row_counts[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.row_counts[self.rank]


def describe_ranks(features, batch, error, labelled: bool, process_group, world: int, device):
    """All-gather each rank's batch description and check that the ranks agree.

    ``batch`` is this rank's validated batch (None when validation raised ``error``).
    Every rank raises the same error for a disagreement; the rank whose input was invalid
    raises its own error and the others say which rank failed.
    """
    ok = batch is not None
    shape = tuple(features.shape) if isinstance(features, torch.Tensor) else ()
    mine = torch.tensor([
        int(ok),
        shape[0] if ok else 0,
        batch.num_rows if ok else 0,
        shape[1] if ok and len(shape) == 3 else 0,
        shape[-1] if ok else 0,
        len(shape) if ok else 0,
        _DTYPE_CODES.get(features.dtype, -1) if ok else -1,
        int(labelled),
    ], dtype=torch.int64, device=device)
    table = all_gather_rows(mine[None], [1] * world, process_group).cpu()
    cols = {name: table[:, i].tolist() for i, name in enumerate(_FIELDS)}
    bad = [r for r, flag in enumerate(cols["ok"]) if not flag]
    if bad:
        if error is not None:
            raise error
        raise RuntimeError(f"the contrastive loss got invalid input on rank(s) {bad} (see the error raised there)")
    for name, what in (("ndim", "number of dimensions"), ("views", "number of views V"), ("dim", "feature size D"),
                       ("labelled", "labels given or not")):
        if len(set(cols[name])) != 1:
            raise ValueError(f"features must have the same {what} on every rank, got {cols[name]} by rank")
    if len(set(cols["dtype"])) != 1:
        names = [str(FLOAT_DTYPES[c]).replace("torch.", "") for c in cols["dtype"]]
        raise ValueError(f"features must have the same dtype on every rank, got {names} by rank")
    return cols
