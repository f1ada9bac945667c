"""How a batch's loss is computed on one device: the registry picks the backend; the dense
reference is differentiated by autograd; a fast backend's engine computes the ``"mean"`` /
``"sum"`` loss and its gradient in one sweep (``backward`` only scales the gradient), or under
``"none"`` the per-anchor losses and, in ``backward``, a gradient sweep from the saved row
statistics and the rows prepared in the forward pass.

Eagerly the engine runs inside a :class:`torch.autograd.Function` (the fewest host operations
per call); under ``torch.compile`` the same engine methods run as the custom operators of
:mod:`.ops`, which Dynamo traces without a graph break.
"""

from __future__ import annotations

import contextlib

import torch

from ..inputs import Batch


def batch_loss(batch: Batch, definition, normalize: bool, reduction: str, backend: str):
    """``(loss, valid)`` of a batch on one device with the backend named ``backend`` ("auto"
    included), reduced as ``reduction`` says; ``valid`` is the per-anchor validity mask, or
    (scalar reductions on a fast backend) the number of valid anchors."""
    with autocast_disabled(batch.features.device):
        return _batch_loss(batch, definition, normalize, reduction, backend)


def autocast_disabled(device: torch.device):
    """A context without autocast on ``device``'s type: the losses choose their own
    precision (float32 accumulation, float32 loss), whatever autocast the caller runs under.
    Eager only: with this region in a ``torch.compile`` graph, SCHaNe's compiled blockwise
    gradients differed from the eager ones (torch 2.14), so compiled code is left as traced."""
    if torch.amp.is_autocast_available(device.type) and not torch.compiler.is_compiling():
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _batch_loss(batch: Batch, definition, normalize: bool, reduction: str, backend: str):
    from . import reference, resolve

    chosen = resolve(backend, batch.features.device)
    if chosen.name == "reference":
        rows, valid = reference.row_losses(batch, definition, normalize)
        return reference.reduce_rows(rows, valid, reduction), valid
    grad_on = torch.is_grad_enabled()
    need_f = grad_on and batch.features.requires_grad
    need_r = grad_on and batch.ref is not None and batch.ref.requires_grad
    if torch.compiler.is_compiling():
        return _operator_loss(batch, definition, normalize, reduction, chosen.name, need_f, need_r)
    engine = chosen.engine(batch.features.dtype)
    args = (batch.labels, batch.ref_labels, batch.num_anchors, bool(normalize))
    if reduction == "none":
        return _Rows.apply(batch.features, batch.ref, engine, definition, args, need_f, need_r, chosen.name)
    return _Reduced.apply(batch.features, batch.ref, engine, definition, args, reduction == "mean", need_f, need_r,
                          chosen.name)


def _operator_loss(batch: Batch, definition, normalize, reduction, backend, need_f, need_r):
    from .ops import OPS

    reduced_op, rows_op = OPS[backend]
    args = (batch.features, batch.labels, batch.ref, batch.ref_labels, definition.name, list(definition.hyper),
            batch.num_anchors, bool(normalize))
    if reduction == "none":
        rows, valid, _ = rows_op(*args)
        return rows, valid
    loss, n_valid, _, _ = reduced_op(*args, reduction == "mean", need_f, need_r)
    return loss, n_valid


def _prepare(engine, features, ref, args):
    labels, ref_labels, num_anchors, normalize = args
    return engine.prepare(features, labels, ref, ref_labels, num_anchors, normalize)


class _Reduced(torch.autograd.Function):
    """The ``"mean"`` / ``"sum"`` loss; its gradient is computed in the forward sweep."""

    @staticmethod
    def forward(ctx, features, ref, engine, definition, args, mean, need_f, need_r, backend):
        prep = _prepare(engine, features, ref, args)
        loss, n_valid, grad_f, grad_r = engine.reduced(prep, definition, mean, need_f, need_r)
        ctx.mark_non_differentiable(n_valid)
        ctx.set_materialize_grads(False)  # no zeros for the count's gradient
        ctx.grads, ctx.backend = (grad_f, grad_r), backend
        ctx.save_for_backward(features, ref)
        return loss, n_valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_n):
        grad_f, grad_r = ctx.grads
        features, ref = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None, None, None
        return (_scaled(grad_f, grad_loss, features, ctx.backend), _scaled(grad_r, grad_loss, ref, ctx.backend),
                None, None, None, None, None, None, None)


class _Rows(torch.autograd.Function):
    """``reduction="none"``: the per-anchor losses; ``backward`` is one gradient sweep from the
    row statistics and the prepared rows of the forward pass."""

    @staticmethod
    def forward(ctx, features, ref, engine, definition, args, need_f, need_r, backend):
        prep = _prepare(engine, features, ref, args)
        loss, valid, stats = engine.rows(prep, definition)
        ctx.mark_non_differentiable(valid)
        ctx.set_materialize_grads(False)
        ctx.state, ctx.backend = (engine, definition, prep, stats, need_f, need_r), backend
        ctx.save_for_backward(features, ref)
        return loss, valid

    @staticmethod
    def backward(ctx, grad_rows, _grad_valid):
        engine, definition, prep, stats, need_f, need_r = ctx.state
        features, ref = ctx.saved_tensors
        if grad_rows is None:
            return None, None, None, None, None, None, None, None
        with autocast_disabled(features.device):  # a backward run inside an autocast region
            grad_f, grad_r = engine.rows_backward(prep, definition, stats, grad_rows.contiguous(), need_f, need_r)
        return (_guarded(grad_f, features, ctx.backend), _guarded(grad_r, ref, ctx.backend),
                None, None, None, None, None, None)


def _scaled(grad, grad_loss, source, backend):
    if grad is None:
        return None
    return _guarded(grad * grad_loss, source, backend)


def _guarded(grad, source, backend):
    """``grad``, connected (through ``source``, the input it is the gradient of) to an autograd
    node that refuses differentiation, when the caller asked for a graph of the gradient
    (``create_graph=True``)."""
    if grad is None or not torch.is_grad_enabled():
        return grad
    return _FirstDerivativeOnly.apply(grad, source, backend)


class _FirstDerivativeOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, source, backend):
        ctx.backend = backend
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fastcon's {ctx.backend!r} backend computes first derivatives only; differentiating its gradient "
            "(create_graph=True, double backward) needs backend='reference'"
        )
