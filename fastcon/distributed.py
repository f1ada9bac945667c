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

``gather="ring"`` computes the same losses and gradients without gathering: each rank's
rows travel around the ring of ranks (point-to-point, the next block in flight while the
current one is computed) and every anchor's row statistics are merged block by block with
log-add-exp; the backward lap sends each block's gradient along behind it to its owner.
No rank holds more than its own rows and two visiting blocks, at the price of W - 1
sequential exchanges per lap (two forward laps for focal SupCon, one backward lap). The
ring does its similarity work in PyTorch whatever ``backend`` says; its values match
``gather=True`` to floating-point rounding.

Every rank must take part in every call (and every backward): they are collectives.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import reference
from ._function import ContrastiveFunction, get_engine, resolve_backend
from ._inputs import prepare
from .blockwise import block_rows
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


@dataclass
class RankLayout:
    """Where this rank's rows sit in the concatenated batch, and every rank's labels."""

    rank: int
    world: int
    row_counts: list[int]  # flattened rows of every rank
    all_labels: torch.Tensor  # [sum(row_counts)] labels of every rank's rows, rank order

    @property
    def start(self) -> int:
        return sum(self.row_counts[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.row_counts[self.rank]


def local_problem(features, labels, *, contrast_mode, normalize, ref_features, ref_labels, process_group):
    """This rank's :class:`~fastcon._inputs.Problem` with labels made global, and the
    :class:`RankLayout` (None without an initialised group or in a world of one).

    Without labels the sample index is the label: it is offset by the rank's first
    sample so it is unique across ranks. Unlabelled ``ref_features`` get a label that no
    row of any rank has (the user's rows are this rank's own: every rank should pass the
    same bank, e.g. a :class:`~fastcon.MemoryBank` pushed with ``gather=True``).
    """
    problem = prepare(features, labels, contrast_mode=contrast_mode, normalize=normalize,
                      ref_features=ref_features, ref_labels=ref_labels)
    info = group_rank_and_size(process_group)
    if info is None or info[1] == 1:
        return problem, None
    rank, world = info
    shapes = _shapes_of_all_ranks(features, problem.z.shape[0], features.shape[0], process_group, world)
    if labels is None:
        # instance discrimination: the sample index must be unique across the global batch
        problem.labels = problem.labels + int(shapes[:rank, 0].sum())
    row_counts = shapes[:, 1].tolist()
    all_labels = all_gather_rows(problem.labels, row_counts, process_group)
    if problem.ref is not None and ref_labels is None:
        problem.ref_labels = torch.full_like(problem.ref_labels, int(all_labels.max()) + 1)
    return problem, RankLayout(rank, world, row_counts, all_labels)


def gathered_problem(problem, layout: RankLayout, process_group):
    """``problem`` with the other ranks' rows (and labels) joined as extra contrast rows
    before the user's ``ref_features``; their gradients flow back to their ranks."""
    all_rows = all_gather_rows_with_grad(problem.z, layout.row_counts, process_group)
    start, end = layout.start, layout.end
    ref = torch.cat([all_rows[:start], all_rows[end:]])
    ref_y = torch.cat([layout.all_labels[:start], layout.all_labels[end:]])
    if problem.ref is not None:
        ref = torch.cat([ref, problem.ref])
        ref_y = torch.cat([ref_y, problem.ref_labels])
    problem.ref, problem.ref_labels = ref, ref_y
    return problem


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


# --- ring mode ---------------------------------------------------------------------
# The contrast rows of every rank visit every rank in turn: at step k rank r holds the
# block of rank (r - k) mod W, and passes it to rank r + 1 while it computes on it. A
# row's loss needs statistics over its whole row (log-sum-exps over masked subsets,
# masked sums, counts), so each visiting block updates running statistics, merged with
# log-add-exp. Focal SupCon needs its row log-sum-exp inside a sum over positives, so it
# takes a second lap. The gradient G = dl/ds of a block is an element-wise function of
# s, the labels and the final statistics: the backward lap recomputes every block's s
# and sends, behind each block, the gradient accumulated for its rows by the ranks it
# visited, which arrives at its owner after a full lap. No rank holds more than its own
# rows, one visiting block and the block in flight (plus that block's gradient).


def _masked_lse(x, mask):
    return torch.logsumexp(x.masked_fill(~mask, -math.inf), dim=1)


def _zero_invalid(x, valid):
    return torch.where(valid, x, torch.zeros_like(x))


def _focal_terms(log_p, pos, gamma):
    """``f(L) = (1 - e^L)^gamma L`` and ``f'(L)`` at the positives (0 elsewhere)."""
    log_p = torch.where(pos, log_p, torch.zeros_like(log_p))
    one_minus_p = -torch.expm1(log_p)
    if gamma == 0:
        w = torch.ones_like(log_p)
        fprime = w
    else:
        w = one_minus_p.clamp(min=0).pow(gamma)
        p = 1 - one_minus_p
        tail = gamma * one_minus_p.clamp(min=torch.finfo(log_p.dtype).tiny).pow(gamma - 1) * p * log_p
        fprime = w - torch.where(one_minus_p > 0, tail, torch.zeros_like(tail))
    zero = torch.zeros_like(log_p)
    return torch.where(pos, w * log_p, zero), torch.where(pos, fprime, zero)


class _RowStatistics:
    """Running per-anchor statistics of one loss, updated block by block (SPEC.md, streaming form)."""

    def __init__(self, spec: LossSpec, num_anchors: int, num_contrast: int, dtype, device):
        self.spec, self.num_contrast = spec, num_contrast
        self.laps = 2 if spec.kind == "focal" else 1

        def full(value, dt=dtype):
            return torch.full((num_anchors,), value, dtype=dt, device=device)

        self.n_pos, self.n_neg = full(0, torch.int64), full(0, torch.int64)
        self.lse_all, self.lse_pos = full(-math.inf), full(-math.inf)
        self.lse_neg_1b, self.lse_neg_b = full(-math.inf), full(-math.inf)  # LSE_N((1+beta)s), LSE_N(beta s)
        self.sum_pos, self.sum_f, self.sum_fprime = full(0.0), full(0.0), full(0.0)

    def update(self, rows: slice, s, pos, neg, lap: int):
        """Merge one block ``s [rows, block]`` (-inf at the anchor's own column) into ``rows``."""
        spec = self.spec
        if lap == 0:
            self.n_pos[rows] += pos.sum(1)
            self.n_neg[rows] += neg.sum(1)
            if spec.kind in ("supcon", "focal"):
                self.lse_all[rows] = torch.logaddexp(self.lse_all[rows], torch.logsumexp(s, 1))
            if spec.kind == "supcon":
                self.sum_pos[rows] += torch.where(pos, s, torch.zeros_like(s)).sum(1)
            if spec.kind == "schane":
                beta = spec.beta
                self.lse_pos[rows] = torch.logaddexp(self.lse_pos[rows], _masked_lse(s, pos))
                # scale first, then mask: a negative beta must not turn masked -inf into +inf
                self.lse_neg_1b[rows] = torch.logaddexp(self.lse_neg_1b[rows], _masked_lse((1 + beta) * s, neg))
                self.lse_neg_b[rows] = torch.logaddexp(self.lse_neg_b[rows], _masked_lse(beta * s, neg))
        else:  # focal's second lap, with the final row log-sum-exp
            f, fprime = _focal_terms(s - self._lse_all_safe()[rows, None], pos, spec.gamma)
            self.sum_f[rows] += f.sum(1)
            self.sum_fprime[rows] += fprime.sum(1)

    def valid(self):
        if self.spec.kind == "schane":
            return (self.n_pos > 0) & (self.n_neg > 0)
        return self.n_pos > 0

    def _lse_all_safe(self):
        return _zero_invalid(self.lse_all, self.n_pos > 0)

    def _schane_u(self):
        """``log Ng_i - log pos_i`` (0 at invalid anchors)."""
        n_pos = self.n_pos.clamp(min=1).to(self.lse_pos.dtype)
        n_neg = self.n_neg.clamp(min=1).to(self.lse_pos.dtype)
        lse_neg_b = torch.log(n_neg) if self.spec.beta == 0 else self.lse_neg_b
        u = torch.log(n_neg) + self.lse_neg_1b - lse_neg_b - (self.lse_pos - torch.log(n_pos))
        return _zero_invalid(u, self.valid())

    def row_loss(self):
        spec, valid = self.spec, self.valid()
        if spec.kind == "supcon":
            n_pos = self.n_pos.clamp(min=1).to(self.sum_pos.dtype)
            loss = -spec.scale * (self.sum_pos / n_pos - self.lse_all)
        elif spec.kind == "schane":
            loss = F.softplus(self._schane_u())
        else:
            loss = -spec.scale / self.num_contrast * self.sum_f
        return _zero_invalid(loss, valid), valid

    def grad_block(self, rows: slice, s, pos, neg, weight):
        """``G = weight_i * dl_i/ds_ij`` for one block (0 at the anchor's own column)."""
        spec, valid = self.spec, self.valid()[rows]
        if spec.kind == "supcon":
            coef = _zero_invalid(spec.scale * weight, valid)
            n_pos = self.n_pos[rows].clamp(min=1).to(s.dtype)
            g = torch.exp(s - self._lse_all_safe()[rows, None]) - pos / n_pos[:, None]
        elif spec.kind == "schane":
            beta = spec.beta
            coef = _zero_invalid(torch.sigmoid(self._schane_u()[rows]) * weight, valid)
            lse_pos, lse_1b, lse_b = (_zero_invalid(x[rows], valid)[:, None]
                                      for x in (self.lse_pos, self.lse_neg_1b, self.lse_neg_b))
            g_neg = (1 + beta) * torch.exp((1 + beta) * s - lse_1b)
            if beta != 0:
                g_neg = g_neg - beta * torch.exp(beta * s - lse_b)
            zero = torch.zeros_like(s)
            g = torch.where(neg, g_neg, torch.where(pos, -torch.exp(s - lse_pos), zero))
        else:
            coef = _zero_invalid(-spec.scale / self.num_contrast * weight, valid)
            log_p = s - self._lse_all_safe()[rows, None]
            _, fprime = _focal_terms(log_p, pos, spec.gamma)
            g = fprime - torch.exp(log_p) * self.sum_fprime[rows, None]
        return g * coef[:, None]


def _block_pieces(anchors_chunk, anchor_labels, block_t, block_labels, own_offset):
    """``s``, positives and negatives of anchor rows against one contrast block;
    ``own_offset`` (the chunk's first row) when the block is the anchors' own rows."""
    s = anchors_chunk @ block_t.T
    neg = anchor_labels[:, None] != block_labels[None, :]
    pos = ~neg
    if own_offset is not None:
        idx = torch.arange(anchors_chunk.shape[0], device=s.device)
        s[idx, idx + own_offset] = -math.inf  # anchor i is contrast column i: not in A(i)
        pos[idx, idx + own_offset] = False
    return s, pos, neg


def _ring_peers(layout: RankLayout, process_group):
    nxt, prv = (layout.rank + 1) % layout.world, (layout.rank - 1) % layout.world
    if process_group is not None:
        nxt, prv = dist.get_global_rank(process_group, nxt), dist.get_global_rank(process_group, prv)
    return nxt, prv


_BLOCK_TAG, _GRAD_TAG = 0, 1  # a block and a gradient of the same shape may be in flight together


def _exchange(send: torch.Tensor, recv: torch.Tensor, peers, process_group, tag=_BLOCK_TAG):
    """Start sending ``send`` to the next rank and receiving ``recv`` from the previous one."""
    nxt, prv = peers
    return dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, nxt, process_group, tag),
        dist.P2POp(dist.irecv, recv, prv, process_group, tag),
    ])


def _wait(requests):
    for request in requests:
        request.wait()


def _ring_laps(z, layout: RankLayout, process_group, visit):
    """Pass every rank's rows ``z`` around the ring once; ``visit(block, owner)`` is called
    for each block (the own block first) while the next one is in flight."""
    peers = _ring_peers(layout, process_group)
    block = z
    for step in range(layout.world):
        owner = (layout.rank - step) % layout.world
        requests = []
        if step < layout.world - 1:
            incoming = z.new_empty((layout.row_counts[(owner - 1) % layout.world], z.shape[1]))
            requests = _exchange(block, incoming, peers, process_group)
        visit(block, owner)
        _wait(requests)
        if requests:
            block = incoming


class _RingContrast(torch.autograd.Function):
    """Per-anchor losses of this rank's anchors against every rank's rows (and ``ref``), by
    ring passes; backward sends each block's gradient around the ring to its owner."""

    @staticmethod
    def forward(ctx, z, ref, labels, ref_labels, layout, num_anchors, spec, process_group):
        z, ref = z.detach().contiguous(), None if ref is None else ref.detach().contiguous()
        inv_t = 1.0 / spec.temperature
        anchors = z[:num_anchors]
        num_contrast = sum(layout.row_counts) + (0 if ref is None else ref.shape[0])
        stats = _RowStatistics(spec, num_anchors, num_contrast, z.dtype, z.device)
        starts = [0] + list(itertools.accumulate(layout.row_counts))

        def visit_rows(block, block_labels, own, lap):
            block_t = block * inv_t
            chunk = block_rows(num_anchors, block.shape[0], spec, z.dtype)  # anchors per chunk, by the budget
            for r0 in range(0, num_anchors, chunk):
                rows = slice(r0, min(num_anchors, r0 + chunk))
                s, pos, neg = _block_pieces(anchors[rows], labels[rows], block_t, block_labels,
                                            r0 if own else None)
                stats.update(rows, s, pos, neg, lap)

        for lap in range(stats.laps):
            def visit(block, owner, lap=lap):
                block_labels = layout.all_labels[starts[owner]:starts[owner + 1]]
                visit_rows(block, block_labels, owner == layout.rank, lap)

            _ring_laps(z, layout, process_group, visit)
            if ref is not None:
                visit_rows(ref, ref_labels, False, lap)
        row_loss, valid = stats.row_loss()
        ctx.save_for_backward(z, ref, labels, ref_labels)
        ctx.stats, ctx.layout, ctx.num_anchors, ctx.spec, ctx.group = stats, layout, num_anchors, spec, process_group
        ctx.has_ref = ref is not None
        ctx.mark_non_differentiable(valid)
        return row_loss, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_row_loss, _grad_valid):
        z, ref, labels, ref_labels = ctx.saved_tensors
        stats, layout, a, spec, group = ctx.stats, ctx.layout, ctx.num_anchors, ctx.spec, ctx.group
        inv_t = 1.0 / spec.temperature
        anchors_t = z[:a] * inv_t
        weight = _zero_invalid(grad_row_loss.to(z.dtype), stats.valid())
        starts = [0] + list(itertools.accumulate(layout.row_counts))
        grad_anchors = torch.zeros_like(anchors_t)

        def block_grad(block, block_labels, own):
            """Add this rank's anchors' gradient to ``grad_anchors``; return the block's."""
            block_t = block * inv_t
            grad_block = torch.zeros_like(block)
            chunk = block_rows(a, block.shape[0], spec, z.dtype)
            for r0 in range(0, a, chunk):
                rows = slice(r0, min(a, r0 + chunk))
                s, pos, neg = _block_pieces(z[rows], labels[rows], block_t, block_labels, r0 if own else None)
                g = stats.grad_block(rows, s, pos, neg, weight[rows])
                grad_anchors[rows] += g @ block_t
                grad_block += g.T @ anchors_t[rows]
            return grad_block

        # Blocks travel as in the forward laps; each block's gradient follows one step behind,
        # summed over the ranks it has visited, and reaches its owner after the last step.
        peers = _ring_peers(layout, group)
        block, grad_in = z, None
        in_flight = []
        for step in range(layout.world):
            owner = (layout.rank - step) % layout.world
            requests = []
            if step < layout.world - 1:
                incoming = z.new_empty((layout.row_counts[(owner - 1) % layout.world], z.shape[1]))
                requests = _exchange(block, incoming, peers, group)
            grad_block = block_grad(block, layout.all_labels[starts[owner]:starts[owner + 1]], owner == layout.rank)
            _wait(in_flight)  # the gradient of this block from the ranks it visited before
            if grad_in is not None:
                grad_block += grad_in
            grad_in = z.new_empty((layout.row_counts[(owner - 1) % layout.world], z.shape[1]))
            in_flight = _exchange(grad_block, grad_in, peers, group, _GRAD_TAG)
            _wait(requests)
            if requests:
                block = incoming
        grad_ref = block_grad(ref, ref_labels, False) if ctx.has_ref else None  # while the last gradient travels
        _wait(in_flight)  # grad_in is now the gradient of this rank's rows from every rank
        grad_z = grad_in
        grad_z[:a] += grad_anchors
        if not ctx.needs_input_grad[1]:
            grad_ref = None
        return grad_z, grad_ref, None, None, None, None, None, None


def ring_row_losses(problem, layout: RankLayout, spec: LossSpec, process_group):
    """``(row_loss [A], valid [A])`` of this rank's anchors by ring passes (see above)."""
    return _RingContrast.apply(problem.z, problem.ref, problem.labels, problem.ref_labels, layout,
                               problem.num_anchors, spec, process_group)


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
    problem, layout = local_problem(
        features, labels, contrast_mode=contrast_mode, normalize=normalize,
        ref_features=ref_features, ref_labels=ref_labels, process_group=process_group,
    )
    world = 1 if layout is None else layout.world
    if layout is not None and gather == "ring":
        row_loss, valid = ring_row_losses(problem, layout, spec, process_group)
        if reduction == "none":
            return row_loss
        total, n_valid = row_loss.sum(), valid.sum()
    else:
        if layout is not None:
            problem = gathered_problem(problem, layout, process_group)
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
