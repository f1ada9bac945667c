"""Blockwise PyTorch backend: never more than one block of similarities in memory.

Anchors are processed ``block_rows`` at a time against every contrast row of the block
given, so a block holds whole rows of similarities ``s [bm, K]``: each anchor's
statistics are complete within its block, the definition finalises them right there,
and the block's gradient ``G`` follows at once. The feature gradients come from two
products per block: ``d anchors = G @ contrast / t`` and ``d contrast += G^T @ anchors / t``.
A forward pass that needs the gradient (the scalar reductions) is therefore one sweep.

The block size follows a memory budget (:func:`set_block_memory`): a block uses about
``bm * K * (tile_temporaries * element size + mask bytes)``. Runs on any device.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from ..losses import Counts
from .common import Engine, Rows

_block_memory = int(float(os.environ.get("FASTCON_BLOCK_MEMORY_MB", "256")) * 2**20)
_MASK_BYTES = 4  # the label mask and the three boolean masks of a block


def set_block_memory(nbytes: int) -> None:
    """Set the memory budget (bytes) of one block of similarities in the blockwise backend."""
    global _block_memory
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    _block_memory = nbytes


def get_block_memory() -> int:
    """The memory budget (bytes) of one block of similarities in the blockwise backend."""
    return _block_memory


@contextmanager
def block_memory(nbytes: int):
    """Context manager that sets the blockwise memory budget and restores it on exit."""
    old = get_block_memory()
    set_block_memory(nbytes)
    try:
        yield
    finally:
        set_block_memory(old)


def block_rows(num_anchors: int, num_contrast: int, definition, dtype: torch.dtype) -> int:
    """How many anchor rows fit into one block under the memory budget."""
    elem = torch.finfo(dtype).bits // 8
    per_row = num_contrast * (elem * definition.tile_temporaries + _MASK_BYTES)
    return int(max(1, min(num_anchors, _block_memory // max(per_row, 1))))


def _blocks(anchors: Rows, contrast: Rows, self_offset, definition):
    """Yield ``(r0, r1, s, contrast_mask, pos, neg)`` per block of anchors (masks exclude self)."""
    a, k = anchors.x.shape[0], contrast.x.shape[0]
    ct = contrast.x * (1.0 / definition.temperature)  # fold 1/t into one operand once
    bm = block_rows(a, k, definition, anchors.x.dtype)
    for r0 in range(0, a, bm):
        r1 = min(a, r0 + bm)
        s = anchors.x[r0:r1] @ ct.T
        same = anchors.ranks[r0:r1, None] == contrast.ranks[None, :]
        not_self = torch.ones_like(same)
        if self_offset is not None:
            rows = torch.arange(r1 - r0, device=s.device)
            cols = rows + (r0 + self_offset)
            inside = cols < k
            not_self[rows[inside], cols[inside]] = False
        pos = same & not_self
        yield r0, r1, s, not_self, pos, ~same


class BlockwiseEngine(Engine):
    """Engine interface of :mod:`fastcon.backends.common` in blocks of whole rows."""

    name = "blockwise"

    def block_stats(self, anchors, contrast, self_offset, definition, dense=None):
        parts_d, parts_p = [], []
        for r0, r1, s, contrast_mask, pos, neg in _blocks(anchors, contrast, self_offset, definition):
            if dense is None:
                d = definition.dense_tile(s, definition.dense_mask(contrast_mask, pos, neg))
                parts_d.append(d)
                if not definition.positive_reads_dense:
                    parts_p.append(definition.positive_tile(s, pos, d))
            else:
                parts_p.append(definition.positive_tile(s, pos, dense[:, r0:r1]))
        d_out = None if dense is not None else torch.cat(parts_d, dim=1)
        p_out = torch.cat(parts_p, dim=1) if parts_p else None
        return d_out, p_out

    def block_grads(self, anchors, contrast, self_offset, definition, params, contrast_rows):
        grad_a = torch.zeros_like(anchors.x)
        if anchors is contrast:
            contrast_rows = contrast.x.shape[0]
        grad_c = contrast.x.new_zeros(contrast_rows, contrast.x.shape[1]) if contrast_rows else None
        for r0, r1, s, contrast_mask, pos, neg in _blocks(anchors, contrast, self_offset, definition):
            self._apply(definition, s, contrast_mask, pos, neg, params[:, r0:r1], anchors, contrast,
                        r0, r1, grad_a, grad_c)
        if anchors is contrast:  # symmetric: one total
            return grad_a.add_(grad_c), None
        return grad_a, grad_c

    @staticmethod
    def _apply(definition, s, contrast_mask, pos, neg, params, anchors, contrast, r0, r1, grad_a, grad_c):
        inv_t = 1.0 / definition.temperature
        g = definition.positive_grad(s, pos, params)
        g += definition.dense_grad(s, definition.dense_mask(contrast_mask, pos, neg), params)
        grad_a[r0:r1] += (g @ contrast.x).mul_(inv_t)
        if grad_c is not None:
            n = grad_c.shape[0]
            grad_c += (g[:, :n].T @ anchors.x[r0:r1]).mul_(inv_t)

    def forward(self, prep, definition, want_grad, need_ref_grad):
        """One sweep: each block's rows are whole, so they are finalised and differentiated
        while the block is in memory."""
        if not want_grad or definition.positive_reads_dense:
            return super().forward(prep, definition, want_grad, need_ref_grad)
        anchors, contrast = prep.anchors, prep.contrast
        symmetric = prep.num_anchors == prep.x.shape[0]
        if symmetric:
            anchors = contrast
        a = prep.num_anchors
        nd = len(definition.dense_slots)
        stats = torch.empty(nd + len(definition.positive_slots), a, dtype=prep.x.dtype, device=prep.x.device)
        loss = torch.empty(a, dtype=prep.x.dtype, device=prep.x.device)
        valid = torch.empty(a, dtype=torch.bool, device=prep.x.device)
        grad_a = torch.zeros_like(anchors.x)
        grad_c = contrast.x.new_zeros(prep.x.shape[0] if need_ref_grad else prep.num_rows, prep.x.shape[1])
        c = prep.counts
        for r0, r1, s, contrast_mask, pos, neg in _blocks(anchors, contrast, 0, definition):
            d = definition.dense_tile(s, definition.dense_mask(contrast_mask, pos, neg))
            p = definition.positive_tile(s, pos, d)
            block_counts = Counts(c.n_pos[r0:r1], c.n_neg[r0:r1], c.num_contrast)
            terms = definition.finalize(d, p, block_counts, None)
            stats[:nd, r0:r1], stats[nd:, r0:r1] = d, p
            loss[r0:r1], valid[r0:r1] = terms.loss, terms.valid
            self._apply(definition, s, contrast_mask, pos, neg, terms.params, anchors, contrast,
                        r0, r1, grad_a, grad_c)
        if symmetric:
            return loss, valid, stats, grad_a.add_(grad_c)
        grad_c[:a] += grad_a
        return loss, valid, stats, grad_c
