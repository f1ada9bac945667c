"""How a batch's loss is computed on one device: the registry picks the backend; the dense
reference is differentiated by autograd, the fast backends run as the custom operators of
:mod:`.ops` (one sweep for the loss and its gradient under ``"mean"`` / ``"sum"``; under
``"none"`` the per-anchor losses, and a gradient sweep from the saved row statistics).
"""

from __future__ import annotations

import torch

from ..inputs import Batch


def batch_loss(batch: Batch, definition, normalize: bool, reduction: str, backend: str):
    """``(loss, valid)`` of a batch on one device with the backend named ``backend`` ("auto"
    included), reduced as ``reduction`` says; ``valid`` is the per-anchor validity mask, or
    (scalar reductions on a fast backend) the number of valid anchors."""
    from . import reference, resolve
    from .ops import OPS

    chosen = resolve(backend, batch.features.device)
    if chosen.name == "reference":
        rows, valid = reference.row_losses(batch, definition, normalize)
        return reference.reduce_rows(rows, valid, reduction), valid
    reduced_op, rows_op = OPS[chosen.name]
    args = (batch.features, batch.labels, batch.ref, batch.ref_labels, definition.name, list(definition.hyper),
            batch.num_anchors, bool(normalize))
    if reduction == "none":
        rows, valid, _ = rows_op(*args)
        return rows, valid
    grad_on = torch.is_grad_enabled()
    need_f = grad_on and batch.features.requires_grad
    need_r = grad_on and batch.ref is not None and batch.ref.requires_grad
    loss, n_valid, _, _ = reduced_op(*args, reduction == "mean", need_f, need_r)
    return loss, n_valid
