"""The one autograd Function behind every fast backend, and backend dispatch.

An *engine* (blockwise PyTorch, Triton, native C++) computes, for the anchors
``z[:A]`` against the contrast rows ``z`` (+ ``ref``):

``engine.forward(z, ref, labels, ref_labels, A, spec, want_grad, need_ref_grad)``
    -> ``(row_loss [A], valid [A], saved tuple, grad_z | None, grad_ref | None)``;
    with ``want_grad`` the gradients of ``sum_i l_i`` are computed in the same pass.
``engine.backward(z, ref, labels, ref_labels, A, spec, saved, row_weight, need_ref_grad)``
    -> ``(grad_z, grad_ref)`` of ``sum_i row_weight_i * l_i``.

For the scalar reductions the gradient is a fixed multiple of ``d sum_i l_i``, so it
is computed during the forward pass (one sweep over the similarities instead of
two) and only scaled in ``backward``. ``reduction="none"`` needs the upstream
per-anchor gradient, so its backward recomputes the sweep with those weights.
"""

from __future__ import annotations

import torch

from ._inputs import Problem
from .spec import LossSpec


class ContrastiveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, ref, labels, ref_labels, num_anchors, spec, reduction, engine):
        need_z = ctx.needs_input_grad[0]
        need_ref = ref is not None and ctx.needs_input_grad[1]
        want_grad = (need_z or need_ref) and reduction != "none"
        z_c = z.detach().contiguous()
        ref_c = None if ref is None else ref.detach().contiguous()
        row_loss, valid, saved, grad_z, grad_ref = engine.forward(
            z_c, ref_c, labels, ref_labels, num_anchors, spec, want_grad, need_ref
        )
        n_valid = valid.sum()
        if reduction == "none":
            out = row_loss
            ctx.save_for_backward(z_c, ref_c, labels, ref_labels, valid, *saved)
        else:
            total = row_loss.sum()
            out = total / n_valid.clamp(min=1).to(total.dtype) if reduction == "mean" else total
            ctx.save_for_backward(grad_z, grad_ref, n_valid)
        ctx.meta = (num_anchors, spec, reduction, engine, need_z, need_ref, ref is not None)
        ctx.mark_non_differentiable(valid)
        return out, valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_valid):
        num_anchors, spec, reduction, engine, need_z, need_ref, has_ref = ctx.meta
        if reduction == "none":
            z, ref, labels, ref_labels, valid, *saved = ctx.saved_tensors
            weight = torch.where(valid, grad_out.to(z.dtype), torch.zeros_like(grad_out, dtype=z.dtype))
            grad_z, grad_ref = engine.backward(
                z, ref if has_ref else None, labels, ref_labels if has_ref else None,
                num_anchors, spec, tuple(saved), weight, need_ref,
            )
        else:
            grad_z, grad_ref, n_valid = ctx.saved_tensors
            scale = grad_out
            if reduction == "mean":
                scale = scale / n_valid.clamp(min=1).to(scale.dtype)
            grad_z = grad_z * scale if grad_z is not None else None
            grad_ref = grad_ref * scale if grad_ref is not None else None
        return (grad_z if need_z else None, grad_ref if need_ref else None,
                None, None, None, None, None, None)


def apply_engine(problem: Problem, spec: LossSpec, reduction: str, engine) -> torch.Tensor:
    loss, _ = ContrastiveFunction.apply(
        problem.z, problem.ref, problem.labels, problem.ref_labels,
        problem.num_anchors, spec, reduction, engine,
    )
    return loss


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from .triton_engine import TritonEngine  # noqa: F401
    except Exception:  # noqa: BLE001 - triton not installed or too old: fall back
        return False
    return True


def _native_usable() -> bool:
    try:
        from . import native
    except Exception:  # noqa: BLE001
        return False
    return native.is_available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device``: Triton on CUDA, else native
    C++ on CPU when built, else blockwise PyTorch."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and _triton_usable(device):
        return "triton"
    if device.type == "cpu" and _native_usable():
        return "native"
    return "blockwise"


def get_engine(name: str, device: torch.device, input_dtype: torch.dtype | None = None):
    """The engine for backend ``name``; ``input_dtype`` (the user's feature dtype) lets the
    Triton engine use half-precision tensor-core products for half-precision users."""
    if name == "blockwise":
        from .blockwise import BlockwiseEngine

        return BlockwiseEngine()
    if name == "triton":
        try:
            from .triton_engine import TritonEngine
        except ImportError as exc:
            raise RuntimeError(f"backend='triton' needs the triton package: {exc}") from exc
        if device.type != "cuda" and not TritonEngine.interpreter_enabled():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                f"is imported, for testing on CPU); got tensors on {device}"
            )
        return TritonEngine(input_dtype)
    if name == "native":
        from . import native

        if not native.is_available():
            raise RuntimeError(
                "backend='native' needs the compiled CPU kernel; build it from the repository root with "
                "`cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2` "
                f"(import error: {native.import_error()})"
            )
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors only; got tensors on {device}")
        return native.NativeEngine()
    raise ValueError(f"unknown backend {name!r}")
