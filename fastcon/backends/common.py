"""What every fast backend shares: the prepared rows, label ranks and counts, and the
generic forward/backward that calls a loss definition around an engine's block computations.

An *engine* computes, for anchor rows against contrast rows (one *block* of the contrast set,
or all of it), two things (:class:`Engine`):

- ``block_stats``: the dense-part and positive-part statistics of the anchors over the
  block's columns (partial statistics merge exactly, see :mod:`fastcon.losses.base`);
- ``block_grads``: ``G @ contrast / t`` and ``G^T @ anchors / t`` for the gradient
  parameters of a definition.

The driver here turns those into the loss and the feature gradients: prepare (flatten,
normalise), statistics, :meth:`~fastcon.losses.base.LossDefinition.finalize`, gradients,
normalisation backward. Nothing here depends on which loss runs. All of it is O(N * D)
PyTorch code without host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..inputs import flatten_rows, unflatten_rows
from ..losses import Counts, LossDefinition


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 input, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def label_ranks(labels: torch.Tensor) -> torch.Tensor:
    """Dense int32 class ids (ranks of the distinct labels) without ``torch.unique``'s host sync."""
    sorted_y, order = torch.sort(labels, stable=True)
    new_class = torch.ones_like(sorted_y, dtype=torch.bool)
    new_class[1:] = sorted_y[1:] != sorted_y[:-1]
    ranks = torch.empty_like(sorted_y)
    ranks[order] = torch.cumsum(new_class, 0) - 1
    return ranks.to(torch.int32)


def joined_labels(labels: torch.Tensor, ref_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """``cat([labels, ref_labels])`` (``labels`` when ``ref_labels`` is None), without a copy when
    the two are consecutive parts of one tensor, as :func:`~fastcon.inputs.check_batch` makes them."""
    if ref_labels is None:
        return labels
    m = labels.shape[0]
    adjacent = (labels.is_contiguous() and ref_labels.is_contiguous() and labels.dtype == ref_labels.dtype
                and not torch.compiler.is_compiling()
                and labels.untyped_storage().data_ptr() == ref_labels.untyped_storage().data_ptr()
                and ref_labels.storage_offset() == labels.storage_offset() + m)
    if adjacent:
        return labels.as_strided((m + ref_labels.shape[0],), (1,), labels.storage_offset())
    return torch.cat([labels, ref_labels])


def contrast_ranks(labels: torch.Tensor, ref_labels, num_unlabelled: int) -> torch.Tensor:
    """int32 class ids of the contrast rows: the batch rows' ``labels``, the labelled ref rows'
    ``ref_labels`` (None: none), then ``num_unlabelled`` unlabelled ref rows, which share a class
    that no labelled row has (the number of labelled rows: larger than any of their ranks)."""
    y = joined_labels(labels, ref_labels)
    ranks = label_ranks(y)
    if num_unlabelled:
        ranks = torch.cat([ranks, ranks.new_full((num_unlabelled,), y.shape[0])])
    return ranks


def class_sizes(ranks: torch.Tensor) -> torch.Tensor:
    """``sizes[i]``: how many rows share row i's class (row i included)."""
    r = ranks.to(torch.int64)
    sorted_r, order = torch.sort(r, stable=True)
    span = torch.searchsorted(sorted_r, sorted_r, right=True) - torch.searchsorted(sorted_r, sorted_r)
    sizes = torch.empty_like(span)
    sizes[order] = span
    return sizes


@dataclass
class Rows:
    """Rows as an engine sees them: ``x [n, D]`` (normalised, compute or dot dtype), int32 ranks."""

    x: torch.Tensor
    ranks: torch.Tensor


@dataclass
class Prepared:
    """A problem ready for the engines: contrast rows ``x = cat(batch rows, ref rows)``;
    the anchors are its first ``num_anchors`` rows (anchor i is contrast column i)."""

    x: torch.Tensor  # [K, D]
    ranks: torch.Tensor  # [K] int32
    num_rows: int  # M, batch rows (the rest of x is ref rows)
    num_anchors: int  # A
    inv_norm: Optional[torch.Tensor]  # [K] float: 1 / |row| (None without normalisation)
    counts: Counts
    features: Optional[torch.Tensor] = None  # the user's batch rows and ref rows, as given
    ref: Optional[torch.Tensor] = None

    @property
    def anchors(self) -> Rows:
        a = self.num_anchors
        return Rows(self.x[:a], self.ranks[:a])

    @property
    def contrast(self) -> Rows:
        return Rows(self.x, self.ranks)


def unlabelled_rows(ref, ref_labels) -> int:
    """How many of the ref rows (the last ones) have no label."""
    if ref is None:
        return 0
    return ref.shape[0] - (0 if ref_labels is None else ref_labels.shape[0])


def normalize_rows(rows: torch.Tensor, dtype: torch.dtype, normalize: bool):
    """``(rows / |rows| in dtype, 1 / |rows|)``; eps = 1e-12 as ``F.normalize``."""
    x = rows.to(dtype)
    if not normalize:
        return x.contiguous(), None
    inv = 1.0 / torch.linalg.vector_norm(x, dim=1).clamp(min=1e-12)
    return (x * inv[:, None]).contiguous(), inv


def normalize_backward(grad: torch.Tensor, x: torch.Tensor, inv_norm: Optional[torch.Tensor]) -> torch.Tensor:
    """Gradient w.r.t. the raw rows given the gradient w.r.t. the normalised rows ``x``."""
    if inv_norm is None:
        return grad
    radial = (grad * x).sum(1, keepdim=True)
    return grad.sub_(x * radial).mul_(inv_norm[:, None])


def counts_for(ranks: torch.Tensor, num_anchors: int, dtype) -> Counts:
    n_same = class_sizes(ranks)[:num_anchors].to(dtype)
    k = ranks.shape[0]
    return Counts(n_pos=n_same - 1, n_neg=k - n_same, num_contrast=k)




class Engine:
    """A fast backend's block computations; the generic forward/backward is below.

    ``self_offset``: anchor i is contrast column ``i + self_offset`` (None: the block holds
    no anchor). With ``anchors is contrast`` the problem is symmetric (every row an anchor),
    which engines may exploit.
    """

    name = "?"

    def dtype_for(self, input_dtype: torch.dtype) -> torch.dtype:
        return compute_dtype(input_dtype)

    def make_rows(self, raw: torch.Tensor, normalize: bool):
        """``(x, inv_norm)``: raw rows ``[n, D]`` normalised into the engine's dtype."""
        return normalize_rows(raw, self.dtype_for(raw.dtype), normalize)

    def normalized_backward(self, grad: torch.Tensor, x: torch.Tensor, inv_norm) -> torch.Tensor:
        """Gradient w.r.t. the raw rows from the gradient w.r.t. ``x`` (compute dtype)."""
        return normalize_backward(grad.to(compute_dtype(x.dtype)), x, inv_norm)

    def prepare(self, features, labels, ref, ref_labels, num_anchors: int, normalize: bool) -> Prepared:
        """The raw batch (``[B, V, D]`` or ``[N, D]``) and extra rows, ready for the block computations."""
        rows = flatten_rows(features)
        contrast = rows if ref is None else torch.cat([rows, ref.to(rows.dtype)])
        x, inv = self.make_rows(contrast, normalize)
        ranks = contrast_ranks(labels, ref_labels, unlabelled_rows(ref, ref_labels))
        counts = counts_for(ranks, num_anchors, compute_dtype(x.dtype))
        return Prepared(x, ranks, rows.shape[0], num_anchors, inv, counts, features, ref)

    def finish(self, prep: Prepared, grad_x: torch.Tensor, features, ref):
        """``(grad of features, grad of ref or None)`` from the gradient w.r.t. the normalised rows."""
        n = grad_x.shape[0]
        inv = None if prep.inv_norm is None else prep.inv_norm[:n]
        g = self.normalized_backward(grad_x, prep.x[:n], inv)
        grad_features = unflatten_rows(g[: prep.num_rows], features).to(features.dtype)
        grad_ref = g[prep.num_rows:].to(ref.dtype) if (ref is not None and n > prep.num_rows) else None
        return grad_features, grad_ref

    def block_stats(self, anchors: Rows, contrast: Rows, self_offset, definition: LossDefinition,
                    dense=None):
        """``(dense, positive)`` statistics of the anchors over the block's columns.

        ``dense`` None: computes the dense part, and the positive part too unless it reads the
        finished dense statistics (``positive`` is then None). ``dense`` given: the positive
        part only, with those finished statistics."""
        raise NotImplementedError

    def block_grads(self, anchors: Rows, contrast: Rows, self_offset, definition, params, contrast_rows: int):
        """``(G @ contrast.x / t, (G^T @ anchors.x / t)[:contrast_rows] or None)`` for the
        gradient parameters ``params``; symmetric: ``((G + G^T) @ x / t, None)``."""
        raise NotImplementedError

    # --- the generic single-device algorithm ------------------------------------------
    def statistics(self, prep: Prepared, definition: LossDefinition):
        """``(dense, positive)`` statistics of the anchors."""
        if prep.num_anchors == 0:
            nd, npos = len(definition.dense_slots), len(definition.positive_slots)
            z = prep.x.new_zeros(nd + npos, 0, dtype=compute_dtype(prep.x.dtype))
            return z[:nd], z[nd:]
        anchors, contrast = prep.anchors, prep.contrast
        if prep.num_anchors == prep.x.shape[0]:
            anchors = contrast  # symmetric: the same rows on both sides
        dense, positive = self.block_stats(anchors, contrast, 0, definition)
        if positive is None:
            _, positive = self.block_stats(anchors, contrast, 0, definition, dense=dense)
        return dense, positive

    def gradients(self, prep: Prepared, definition, params, need_ref_grad: bool):
        """Gradient w.r.t. the normalised contrast rows (``[K, D]``, or ``[M, D]`` when the ref
        rows need none)."""
        symmetric = prep.num_anchors == prep.x.shape[0]
        contrast = prep.contrast
        anchors = contrast if symmetric else prep.anchors
        contrast_rows = prep.x.shape[0] if need_ref_grad else prep.num_rows
        grad_a, grad_c = self.block_grads(anchors, contrast, 0, definition, params, contrast_rows)
        if symmetric:
            return grad_a
        grad_c[: prep.num_anchors] += grad_a
        return grad_c

    def forward(self, prep: Prepared, definition, want_grad: bool, need_ref_grad: bool):
        """``(row_loss, valid, statistics, grad wrt x or None)``; the statistics as one tensor
        ``[slots, A]`` or as the pair ``(dense, positive)``."""
        dense, positive = self.statistics(prep, definition)
        terms = definition.finalize(dense, positive, prep.counts, None)
        grad = self.gradients(prep, definition, terms.params, need_ref_grad) if want_grad else None
        return terms.loss, terms.valid, (dense, positive), grad

    def backward(self, prep: Prepared, definition, stats, weight, need_ref_grad: bool):
        terms = split_finalize(definition, stats, prep.counts, weight)
        return self.gradients(prep, definition, terms.params, need_ref_grad)

    # --- what the operators call ---------------------------------------------------------
    def stats_rows(self, definition) -> int:
        """Rows of the statistics :meth:`rows` returns (what :meth:`rows_backward` reads)."""
        return len(definition.dense_slots) + len(definition.positive_slots)

    def reduced(self, prep: Prepared, definition, mean: bool, need_f: bool, need_r: bool):
        """``(loss, n_valid, grad of features or None, grad of ref or None)``: the ``"mean"`` (or
        ``"sum"``) loss and, in the same sweep, its gradient."""
        want = need_f or need_r
        row_loss, valid, _, grad = self.forward(prep, definition, want, need_r)
        n_valid = valid.sum()
        total = row_loss.sum()
        if mean:
            divisor = n_valid.clamp(min=1).to(total.dtype)
            total = total / divisor
            if want:
                grad = grad.div_(divisor)
        grad_f = grad_r = None
        if want:
            grad_f, grad_r = self.finish(prep, grad, prep.features, prep.ref)
        return total, n_valid, (grad_f if need_f else None), (grad_r if need_r else None)

    def rows(self, prep: Prepared, definition):
        """``(per-anchor loss, valid, statistics)`` of ``reduction="none"``."""
        row_loss, valid, stats, _ = self.forward(prep, definition, False, False)
        return row_loss, valid, (stats if isinstance(stats, torch.Tensor) else torch.cat(stats))

    def rows_backward(self, prep: Prepared, definition, stats, grad_rows, need_f: bool, need_r: bool):
        """Gradients of ``sum_i grad_rows_i l_i`` from the statistics of :meth:`rows`."""
        grad = self.backward(prep, definition, stats, grad_rows.to(stats.dtype), need_r)
        grad_f, grad_r = self.finish(prep, grad, prep.features, prep.ref)
        return (grad_f if need_f else None), (grad_r if need_r else None)


def split_finalize(definition: LossDefinition, stats, counts: Counts, weight):
    nd = len(definition.dense_slots)
    return definition.finalize(stats[:nd], stats[nd:], counts, weight)
