"""``gather="ring"``: every rank's rows visit every rank in turn; no rank holds the global batch.

At step k rank r holds the block of rank ``(r - k) mod W`` and passes it on to rank
``r + 1`` while it computes on it. For each visiting block the chosen backend's block
computation (:meth:`~fastcon.backends.common.Engine.block_stats`) gives the local
anchors' partial statistics over the block's columns, merged by the loss definition
(log-add-exp / addition); a loss whose positive part reads the finished dense part
(focal SupCon) takes a second lap. The backward lap recomputes each block's gradient
products (:meth:`~fastcon.backends.common.Engine.block_grads`) and sends, behind each
block, the gradient its rows have gathered so far, which reaches their owner after a
full lap. No rank holds more than its own rows, one visiting block and the block in flight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..backends.common import Rows, class_sizes, contrast_ranks, unlabelled_rows
from ..losses import Counts

_BLOCK_TAG, _GRAD_TAG = 0, 1  # a block and a gradient of the same shape may be in flight together


def _peers(layout, process_group):
    nxt, prv = (layout.rank + 1) % layout.world, (layout.rank - 1) % layout.world
    if process_group is not None:
        nxt, prv = dist.get_global_rank(process_group, nxt), dist.get_global_rank(process_group, prv)
    return nxt, prv


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


def ring_lap(x: torch.Tensor, layout, process_group, visit, trailing=None):
    """Pass every rank's rows ``x`` around the ring once, calling ``visit(block, owner)`` on
    each block (the own block first) while the next one is in flight.

    With ``trailing``, ``visit`` returns a tensor for the block's rows that follows the
    block one step behind, summed over the ranks it visits; the sum for this rank's own rows
    is returned after the lap (the backward lap's gradients)."""
    peers = _peers(layout, process_group)
    block, carried, in_flight = x, None, []
    for step in range(layout.world):
        owner = (layout.rank - step) % layout.world
        requests = []
        incoming_rows = layout.row_counts[(owner - 1) % layout.world]
        if step < layout.world - 1:
            incoming = x.new_empty((incoming_rows, x.shape[1]))
            requests = _exchange(block, incoming, peers, process_group)
        result = visit(block, owner)
        if trailing is not None:
            _wait(in_flight)  # what the ranks visited before sent for this block
            if carried is not None:
                result += carried
            carried = result.new_empty((incoming_rows, x.shape[1]))
            in_flight = _exchange(result, carried, peers, process_group, _GRAD_TAG)
        _wait(requests)
        if requests:
            block = incoming
    if trailing is not None:
        _wait(in_flight)
        return carried
    return None


class _RingContrast(torch.autograd.Function):
    """Per-anchor losses of this rank's anchors against every rank's rows (and ``ref``)."""

    @staticmethod
    def forward(ctx, rows, ref, labels, ref_labels, layout, num_anchors, normalize, definition, engine, group):
        rows, ref = rows.detach(), None if ref is None else ref.detach()
        x, inv = engine.make_rows(rows, normalize)
        x_ref, inv_ref = engine.make_rows(ref, normalize) if ref is not None else (None, None)
        ranks = contrast_ranks(layout.all_labels, ref_labels, unlabelled_rows(ref, ref_labels))
        starts = [sum(layout.row_counts[:r]) for r in range(layout.world + 1)]
        anchors = Rows(x[:num_anchors], ranks[layout.start:layout.start + num_anchors])
        n_same = class_sizes(ranks)[layout.start:layout.start + num_anchors].to(torch.float64)
        k = ranks.shape[0]
        counts = Counts(n_same - 1, k - n_same, k)

        def block_rows(block, owner):
            return Rows(block, ranks[starts[owner]:starts[owner + 1]]), (0 if owner == layout.rank else None)

        def merged(slots, acc, part):
            return part if acc is None else definition.merge(slots, acc, part)

        state = {"dense": None, "positive": None}

        def visit(block, owner, dense=None):
            contrast, offset = block_rows(block, owner)
            d, p = engine.block_stats(anchors, contrast, offset, definition, dense=dense)
            if dense is None:
                state["dense"] = merged(definition.dense_slots, state["dense"], d)
            if p is not None:
                state["positive"] = merged(definition.positive_slots, state["positive"], p)

        ref_rows = None if ref is None else Rows(x_ref, ranks[starts[-1]:])
        ring_lap(x, layout, group, visit)
        if ref_rows is not None:
            d, p = engine.block_stats(anchors, ref_rows, None, definition)
            state["dense"] = definition.merge(definition.dense_slots, state["dense"], d)
            if p is not None:
                state["positive"] = merged(definition.positive_slots, state["positive"], p)
        if definition.positive_reads_dense:  # a second lap, with the finished dense statistics
            final = state["dense"]
            ring_lap(x, layout, group, lambda block, owner: visit(block, owner, dense=final))
            if ref_rows is not None:
                _, p = engine.block_stats(anchors, ref_rows, None, definition, dense=final)
                state["positive"] = definition.merge(definition.positive_slots, state["positive"], p)
        dtype = state["dense"].dtype
        counts = Counts(counts.n_pos.to(dtype), counts.n_neg.to(dtype), k)
        terms = definition.finalize(state["dense"], state["positive"], counts, None)
        ctx.save_for_backward(x, inv, x_ref, inv_ref, state["dense"], state["positive"], ranks)
        ctx.meta = (layout, num_anchors, definition, engine, group, counts, starts, anchors)
        ctx.mark_non_differentiable(terms.valid)
        return terms.loss, terms.valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_valid):
        x, inv, x_ref, inv_ref, dense, positive, ranks = ctx.saved_tensors
        layout, a, definition, engine, group, counts, starts, anchors = ctx.meta
        terms = definition.finalize(dense, positive, counts, None)
        weight = torch.where(terms.valid, grad_loss.to(dense.dtype), torch.zeros_like(dense[0]))
        params = definition.finalize(dense, positive, counts, weight).params
        grad_anchors = torch.zeros(a, x.shape[1], dtype=dense.dtype, device=x.device)

        def visit(block, owner):
            contrast = Rows(block, ranks[starts[owner]:starts[owner + 1]])
            offset = 0 if owner == layout.rank else None
            g_a, g_c = engine.block_grads(anchors, contrast, offset, definition, params, block.shape[0])
            grad_anchors.add_(g_a)
            if g_c is None:  # an empty block (a rank with no rows): nothing flows back to it
                return block.new_zeros(block.shape, dtype=dense.dtype)
            return g_c.to(dense.dtype)

        grad_x = ring_lap(x, layout, group, visit, trailing=True)
        grad_ref = None
        if x_ref is not None and ctx.needs_input_grad[1]:
            g_a, grad_ref = engine.block_grads(anchors, Rows(x_ref, ranks[starts[-1]:]), None, definition, params,
                                               x_ref.shape[0])
            grad_anchors.add_(g_a)
            grad_ref = engine.normalized_backward(grad_ref, x_ref, inv_ref)
        elif x_ref is not None:
            g_a, _ = engine.block_grads(anchors, Rows(x_ref, ranks[starts[-1]:]), None, definition, params, 0)
            grad_anchors.add_(g_a)
        grad_x[:a] += grad_anchors
        grad_rows = engine.normalized_backward(grad_x, x, inv)
        return (grad_rows,) + (grad_ref,) + (None,) * 8


def ring_row_losses(batch, layout, definition, normalize: bool, engine, process_group):
    """``(row_loss [A], valid [A])`` of this rank's anchors by ring passes (see the module docstring)."""
    rows = batch.rows
    loss, valid = _RingContrast.apply(rows, batch.ref, batch.labels, batch.ref_labels, layout, batch.num_anchors,
                                      normalize, definition, engine, process_group)
    return loss, valid
