"""The one autograd Function behind every fast backend, and the reductions.

For the scalar reductions the gradient is a fixed multiple of ``d sum_i l_i``, so it is
computed during the forward pass (one sweep over the similarities instead of two where
the engine can) and only scaled in ``backward``. ``reduction="none"`` needs the upstream
per-anchor gradient, so its backward recomputes the gradient sweep with those weights
from the saved row statistics.

Second derivatives: the fast backends compute first derivatives analytically; a
``create_graph=True`` backward raises an error naming the backend that supports it
(``reference``) instead of returning a silently wrong second derivative.
"""

from __future__ import annotations

import torch

from ..inputs import Batch


def _no_double_backward(engine) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastcon's {engine.name!r} backend computes first derivatives only; differentiating its "
            "gradient (create_graph=True, double backward) needs backend='reference'"
        )


class ContrastiveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, ref, labels, ref_labels, num_anchors, normalize, definition, reduction, engine):
        need_f = ctx.needs_input_grad[0]
        need_ref = ref is not None and ctx.needs_input_grad[1]
        want_grad = (need_f or need_ref) and reduction != "none"
        features = features.detach()
        ref = None if ref is None else ref.detach()
        prep = engine.prepare(features, labels, ref, ref_labels, num_anchors, normalize)
        loss, valid, stats, grad_x = engine.forward(prep, definition, want_grad, need_ref)
        if reduction == "none":
            out = loss
            ctx.save_for_backward(features, ref, labels, ref_labels, stats, valid)
        else:
            total = loss.sum()
            n_valid = valid.sum()
            out = total / n_valid.clamp(min=1).to(total.dtype) if reduction == "mean" else total
            grad_f = grad_ref = None
            if want_grad:
                grad_f, grad_ref = engine.finish(prep, grad_x, features, ref)
            ctx.save_for_backward(grad_f, grad_ref, n_valid)
        ctx.meta = (num_anchors, normalize, definition, reduction, engine, need_f, need_ref)
        ctx.mark_non_differentiable(valid)
        return out, valid

    @staticmethod
    def backward(ctx, grad_out, _grad_valid):
        num_anchors, normalize, definition, reduction, engine, need_f, need_ref = ctx.meta
        _no_double_backward(engine)
        if reduction == "none":
            features, ref, labels, ref_labels, stats, valid = ctx.saved_tensors
            prep = engine.prepare(features, labels, ref, ref_labels, num_anchors, normalize)
            weight = torch.where(valid, grad_out.to(stats.dtype), torch.zeros_like(stats[0]))
            grad_x = engine.backward(prep, definition, stats, weight, need_ref)
            grad_f, grad_ref = engine.finish(prep, grad_x, features, ref)
        else:
            grad_f, grad_ref, n_valid = ctx.saved_tensors
            scale = grad_out
            if reduction == "mean":
                scale = scale / n_valid.clamp(min=1).to(scale.dtype)
            grad_f = grad_f * scale.to(grad_f.dtype) if grad_f is not None else None
            grad_ref = grad_ref * scale.to(grad_ref.dtype) if grad_ref is not None else None
        return (grad_f if need_f else None, grad_ref if need_ref else None) + (None,) * 7


def apply_engine(batch: Batch, definition, normalize: bool, reduction: str, engine):
    """``(loss, valid)`` of the batch on a fast engine."""
    return ContrastiveFunction.apply(batch.features, batch.ref, batch.labels, batch.ref_labels,
                                     batch.num_anchors, normalize, definition, reduction, engine)


def batch_loss(batch: Batch, definition, normalize: bool, reduction: str, backend: str):
    """``(loss, valid)`` of a batch on one device with the backend named ``backend`` (registry
    resolution, "auto" included); ``loss`` is reduced as ``reduction`` says."""
    from . import engine_for, reference

    _, engine = engine_for(backend, batch.features.device, batch.features.dtype)
    if engine is None:
        rows, valid = reference.row_losses(batch, definition, normalize)
        return reference.reduce_rows(rows, valid, reduction), valid
    return apply_engine(batch, definition, normalize, reduction, engine)
