"""The fast backends as ``torch.library`` custom operators, so that ``torch.compile``
(``fullgraph=True`` included) traces through every fastcon loss.

Each engine of the registry (``blockwise``, ``native``, ``triton``) gets three operators,
all with fake (meta) implementations and registered autograd:

``fastcon::<backend>_reduced(features, labels, ref, ref_labels, loss, hyper, num_anchors,
normalize, mean, need_features_grad, need_ref_grad) -> (loss, n_valid, grad_features, grad_ref)``
    the ``"mean"`` / ``"sum"`` loss and, in the same sweep, the gradient of the summed loss
    (``backward`` only scales it, by the upstream gradient over the divisor of ``"mean"``,
    through ``fastcon::scaled_gradient``: one pass, one rounding to the features' dtype);
``fastcon::<backend>_rows(...) -> (row_loss, valid, stats)``
    ``reduction="none"``: the per-anchor losses and the row statistics;
``fastcon::<backend>_rows_backward(..., stats, weight, ...) -> (grad_features, grad_ref)``
    the gradient of ``sum_i weight_i l_i`` from the saved statistics.

``loss`` and ``hyper`` name a definition of :mod:`fastcon.losses` and its hyper-parameters.
The fast backends compute first derivatives analytically: differentiating their gradient
(``create_graph=True``) reaches the autograd of ``scaled_gradient`` / ``*_rows_backward``,
which raises an error naming the backend that supports it (``reference``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..losses import definition as make_definition
from .common import compute_dtype

ENGINE_BACKENDS = ("blockwise", "native", "triton")


_LIB = torch.library.Library("fastcon", "FRAGMENT")


class _Op:
    """An operator of the ``fastcon`` namespace: schema inferred from ``fn``'s annotations,
    ``fn`` its kernel for every device (``CompositeExplicitAutograd``). Unlike
    ``torch.library.custom_op``, whose kernels import ``torch._dynamo`` on the first eager call
    (about 150 MB resident in every training process), this defines the operator directly."""

    def __init__(self, name: str, fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        self.qualname = f"fastcon::{name}"
        self.op = getattr(torch.ops.fastcon, name).default

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def __call__(self, *args):
        return self.op(*args)


def _custom_op(qualname: str):
    return lambda fn: _Op(qualname.split("::", 1)[1], fn)


def _engine(backend: str, dtype: torch.dtype):
    from . import REGISTRY

    return REGISTRY[backend].engine(dtype)


def _empty_grad(like: Optional[Tensor], needed: bool) -> Tensor:
    if like is not None and needed:
        return torch.empty_like(like)
    ref = like if like is not None else torch.empty(0)
    return ref.new_empty(0)


def _distinct(grad_f: Tensor, grad_r: Tensor) -> Tensor:
    """``grad_r``, copied if it shares ``grad_f``'s buffer (engines may return two views of one
    gradient; a custom operator's outputs must not alias each other)."""
    if grad_r.numel() and grad_f.numel() and grad_r.untyped_storage().data_ptr() == \
            grad_f.untyped_storage().data_ptr():
        return grad_r.clone()
    return grad_r


def _no_second_derivative(backend: Optional[str]):
    """The autograd of a gradient operator: differentiating it again is refused, clearly."""

    def backward(ctx, *grads):
        name = backend if backend is not None else ctx.backend
        raise RuntimeError(
            f"fastcon's {name!r} backend computes first derivatives only; differentiating its gradient "
            "(create_graph=True, double backward) needs backend='reference'"
        )

    return backward


@_custom_op("fastcon::scaled_gradient")
def scaled_gradient(grad: Tensor, scale: Tensor, source: Tensor, backend: str) -> Tensor:
    """``grad * scale`` (``scale`` a 0-dim tensor), computed in float32 for half gradients.
    ``source`` is the input ``grad`` is the gradient of: it is not read, it only connects the
    result to the graph, so that differentiating it (double backward) reaches the error below."""
    if grad.numel() == 0:
        return grad.clone()
    return (grad.to(compute_dtype(grad.dtype)) * scale.to(compute_dtype(grad.dtype))).to(grad.dtype)


@scaled_gradient.register_fake
def _(grad, scale, source, backend):
    return torch.empty_like(grad)


def _setup_none(ctx, inputs, output):
    ctx.backend = inputs[3]


torch.library.register_autograd("fastcon::scaled_gradient", _no_second_derivative(None),
                                setup_context=_setup_none, lib=_LIB)


@functools.lru_cache(maxsize=64)
def _definition(loss: str, hyper: tuple):
    return make_definition(loss, hyper)


def _prepared(backend: str, features, labels, ref, ref_labels, loss, hyper, num_anchors, normalize):
    definition = _definition(loss, tuple(hyper))
    engine = _engine(backend, features.dtype)
    return engine, definition, engine.prepare(features, labels, ref, ref_labels, num_anchors, normalize)


def _register(backend: str):
    """The three operators of one engine."""
    ns = f"fastcon::{backend}"

    @_custom_op(f"{ns}_reduced")
    def reduced(features: Tensor, labels: Tensor, ref: Optional[Tensor], ref_labels: Optional[Tensor], loss: str,
                hyper: list[float], num_anchors: int, normalize: bool, mean: bool, need_features_grad: bool,
                need_ref_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        engine, definition, prep = _prepared(backend, features, labels, ref, ref_labels, loss, hyper, num_anchors,
                                             normalize)
        total, n_valid, grad_f, grad_r = engine.reduced(prep, definition, mean, need_features_grad,
                                                        need_ref_grad and ref is not None)
        grad_f = grad_f if grad_f is not None else _empty_grad(features, False)
        grad_r = grad_r if grad_r is not None else _empty_grad(ref, False)
        return total, n_valid, grad_f, _distinct(grad_f, grad_r)

    @reduced.register_fake
    def _(features, labels, ref, ref_labels, loss, hyper, num_anchors, normalize, mean, need_features_grad,
          need_ref_grad):
        cdtype = compute_dtype(features.dtype)
        return (features.new_empty((), dtype=cdtype), features.new_empty((), dtype=torch.int64),
                _empty_grad(features, need_features_grad), _empty_grad(ref, need_ref_grad))

    def reduced_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2], output[3])
        ctx.save_for_backward(output[2], output[3], inputs[0], inputs[2])

    def reduced_backward(ctx, grad_loss, _grad_n, _grad_f, _grad_r):
        # the gradients are those of the returned loss ("mean" divided already): scale once
        grad_f, grad_r, features, ref = ctx.saved_tensors
        gf = scaled_gradient(grad_f, grad_loss, features, backend) if grad_f.numel() else None
        gr = scaled_gradient(grad_r, grad_loss, ref, backend) if grad_r.numel() else None
        return gf, None, gr, None, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{ns}_reduced", reduced_backward, setup_context=reduced_setup, lib=_LIB)

    @_custom_op(f"{ns}_rows")
    def rows(features: Tensor, labels: Tensor, ref: Optional[Tensor], ref_labels: Optional[Tensor], loss: str,
             hyper: list[float], num_anchors: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
        engine, definition, prep = _prepared(backend, features, labels, ref, ref_labels, loss, hyper, num_anchors,
                                             normalize)
        row_loss, valid, stats = engine.rows(prep, definition)
        return row_loss.clone(), valid.clone(), stats.contiguous().clone()

    @rows.register_fake
    def _(features, labels, ref, ref_labels, loss, hyper, num_anchors, normalize):
        d = _definition(loss, tuple(hyper))
        cdtype = compute_dtype(features.dtype)
        slots = _engine(backend, features.dtype).stats_rows(d)
        return (features.new_empty(num_anchors, dtype=cdtype), features.new_empty(num_anchors, dtype=torch.bool),
                features.new_empty(slots, num_anchors, dtype=cdtype))

    @_custom_op(f"{ns}_rows_backward")
    def rows_backward(features: Tensor, labels: Tensor, ref: Optional[Tensor], ref_labels: Optional[Tensor],
                      loss: str, hyper: list[float], num_anchors: int, normalize: bool, stats: Tensor, valid: Tensor,
                      grad_rows: Tensor, need_features_grad: bool, need_ref_grad: bool) -> tuple[Tensor, Tensor]:
        engine, definition, prep = _prepared(backend, features, labels, ref, ref_labels, loss, hyper, num_anchors,
                                             normalize)
        weight = torch.where(valid, grad_rows.to(stats.dtype), torch.zeros_like(stats[0]))
        grad_f, grad_r = engine.rows_backward(prep, definition, stats, weight, need_features_grad,
                                              need_ref_grad and ref is not None)
        grad_f = grad_f if grad_f is not None else _empty_grad(features, False)
        grad_r = grad_r if grad_r is not None else _empty_grad(ref, False)
        return grad_f, _distinct(grad_f, grad_r)

    @rows_backward.register_fake
    def _(features, labels, ref, ref_labels, loss, hyper, num_anchors, normalize, stats, valid, grad_rows,
          need_features_grad, need_ref_grad):
        return _empty_grad(features, need_features_grad), _empty_grad(ref, need_ref_grad)

    torch.library.register_autograd(f"{ns}_rows_backward", _no_second_derivative(backend),
                                    setup_context=lambda ctx, inputs, output: None, lib=_LIB)

    def rows_setup(ctx, inputs, output):
        features, labels, ref, ref_labels, loss, hyper, num_anchors, normalize = inputs
        ctx.args = (loss, hyper, num_anchors, normalize)
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(features, labels, ref, ref_labels, output[2], output[1])

    def rows_grad(ctx, grad_rows, _grad_valid, _grad_stats):
        features, labels, ref, ref_labels, stats, valid = ctx.saved_tensors
        need_f, need_r = ctx.needs_input_grad[0], ref is not None and ctx.needs_input_grad[2]
        grad_f, grad_r = rows_backward(features, labels, ref, ref_labels, *ctx.args, stats, valid,
                                       grad_rows.contiguous(), need_f, need_r)
        return (grad_f if need_f else None), None, (grad_r if need_r else None), None, None, None, None, None

    torch.library.register_autograd(f"{ns}_rows", rows_grad, setup_context=rows_setup, lib=_LIB)
    return reduced.op, rows.op


OPS = {b: _register(b) for b in ENGINE_BACKENDS}
