"""Triton backend (host side): launches :mod:`fastcon.triton_kernels` for the engine
interface of :class:`fastcon._function.ContrastiveFunction`.

Memory beyond the inputs is O(N * D): the contrast rows ``cat(z, ref)`` (in the dot
dtype), float32 gradients, and a few float32 numbers per anchor. The per-anchor math
that turns the kernels' statistics into losses and gradient coefficients is O(A)
PyTorch code here, next to the kernels that produce and consume it.

Precision: float32 input is multiplied exactly (``input_precision="ieee"``, no TF32),
so results match the reference. For bfloat16 / float16 users (the engine is told the
user's dtype), the normalised rows are rounded back to that dtype for the tensor-core
products, with float32 accumulation and float32 softmax math. float64 input runs on
the blockwise engine (Triton's float64 products have no tensor cores, and the
reference comparison in float64 is the blockwise engine's job).

Determinism: no atomics; every output element is written by one program in a fixed
order, so a run is bitwise reproducible for a given tile configuration. The autotuner
picks one per key and process; ``FASTCON_TRITON_AUTOTUNE=0`` fixes it, for results
that are bitwise identical across processes as well.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton

from . import triton_kernels as kernels
from .spec import LossSpec

_LOSS_IDS = {"supcon": 0, "schane": 1, "focal": 2}

# Under the interpreter (CPU tests) one small fixed configuration keeps runs fast and
# makes N not a multiple of the tile; tests may override it (FASTCON_TRITON_TILE).
_INTERPRET_TILE = int(os.environ.get("FASTCON_TRITON_TILE", "16"))
# FASTCON_TRITON_AUTOTUNE=0 replaces the autotuner by this configuration: results are then
# bitwise identical across processes too (the autotuner's choice may differ between
# processes, and the tile shape decides the order of the float32 sums).
_FIXED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}


def _autotune() -> bool:
    return not TritonEngine.interpreter_enabled() and os.environ.get("FASTCON_TRITON_AUTOTUNE", "1") != "0"


def _stats_configs():
    shapes = [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 3),
              (64, 128, 64, 4, 3), (128, 64, 128, 8, 2), (64, 64, 128, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=st)
            for m, n, d, w, st in shapes]


def _grad_configs():
    shapes = [(64, 64, 64, 4, 2), (128, 64, 64, 8, 2), (64, 128, 64, 8, 2), (64, 64, 32, 4, 3),
              (128, 128, 32, 8, 2), (32, 64, 64, 4, 2), (64, 64, 128, 4, 2), (128, 64, 128, 8, 2),
              (32, 128, 64, 4, 2), (64, 32, 128, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=st)
            for m, n, d, w, st in shapes]


# Bucketed keys: K_BUCKET = ceil(log2 K), so a new batch size re-uses the tuning of
# its power-of-two bucket instead of re-tuning.
_KEY = ["K_BUCKET", "D", "LOSS"]
_tuned = {}


def _kernel(name: str):
    """The kernel, wrapped in the autotuner on GPU (not under the interpreter)."""
    if name not in _tuned:
        fn = getattr(kernels, name)
        if _autotune():
            configs = _stats_configs() if name == "row_stats_kernel" else _grad_configs()
            key = _KEY + (["WRT_CONTRAST", "SYMMETRIC", "BLOCK_DO"] if name == "grad_kernel" else ["FOCAL_TERMS"])
            fn = triton.autotune(configs=configs, key=key)(fn)
        _tuned[name] = fn
    return _tuned[name]


def _tile_args():
    """Launch arguments the autotuner would otherwise choose."""
    if TritonEngine.interpreter_enabled():
        t = _INTERPRET_TILE
        return {"BLOCK_M": t, "BLOCK_N": t, "BLOCK_D": t}
    return {} if _autotune() else dict(_FIXED_CONFIG)


def _flags(spec: LossSpec, x: torch.Tensor):
    exact = x.dtype == torch.float32
    return dict(LOSS=_LOSS_IDS[spec.kind], BETA_ZERO=spec.beta == 0.0, GAMMA_ZERO=spec.gamma == 0.0,
                # "ieee": exact float32 products, never TF32 (the mode only concerns float32 operands)
                DOT_PRECISION="ieee" if exact else "tf32",
                UPCAST_DOT=TritonEngine.interpreter_enabled() and not exact)


def row_stats(x, y, num_anchors, spec: LossSpec) -> torch.Tensor:
    """Launch the forward kernel(s): float32 ``stats [5, A]`` (layout in triton_kernels)."""
    k, d = x.shape
    a = num_anchors
    stats = torch.zeros(kernels.NUM_STATS, a, dtype=torch.float32, device=x.device)
    kernel = _kernel("row_stats_kernel")
    grid = lambda meta: (triton.cdiv(a, meta["BLOCK_M"]),)  # noqa: E731
    common = dict(K_BUCKET=max(0, math.ceil(math.log2(k))), **_flags(spec, x), **_tile_args())
    inv_t = 1.0 / spec.temperature
    kernel[grid](x, y, stats, a, k, d, inv_t, spec.beta, spec.gamma, FOCAL_TERMS=False, **common)
    if spec.kind == "focal":
        # The focal sum needs each anchor's full log-sum-exp first: a second sweep.
        kernel[grid](x, y, stats, a, k, d, inv_t, spec.beta, spec.gamma, FOCAL_TERMS=True, **common)
    return stats


def row_terms(stats: torch.Tensor, spec: LossSpec, num_contrast: int, weight: torch.Tensor):
    """Per-anchor loss, validity, and the gradient parameters ``prm [5, A]`` of
    ``sum_i weight_i l_i`` (layout in ``triton_kernels._gradient_tile``)."""
    zero = torch.zeros_like(stats[0])
    prm = torch.zeros_like(stats)

    def keep(x, valid):
        return torch.where(valid, x, zero)

    if spec.kind == "supcon":
        lse, sum_pos, n_pos = stats[0], stats[1], stats[2]
        valid = n_pos > 0
        n = n_pos.clamp(min=1)
        loss = keep(-spec.scale * (sum_pos / n - lse), valid)
        coef = keep(spec.scale * weight, valid)
        prm[0], prm[3], prm[4] = keep(lse, valid), coef, coef / n
    elif spec.kind == "schane":
        lse_pos, lse_n1, lse_nb, n_pos, n_neg = stats
        valid = (n_pos > 0) & (n_neg > 0)
        log_n_neg = torch.log(n_neg.clamp(min=1))
        if spec.beta == 0:
            lse_nb = log_n_neg  # LSE of beta*s = 0 over N(i)
        u = keep(log_n_neg + torch.log(n_pos.clamp(min=1)) + lse_n1 - lse_nb - lse_pos, valid)
        loss = keep(F.softplus(u), valid)
        coef = keep(torch.sigmoid(u) * weight, valid)
        prm[0], prm[1], prm[2], prm[3] = keep(lse_pos, valid), keep(lse_n1, valid), keep(lse_nb, valid), coef
    else:
        lse, n_pos, loss_sum, fprime_sum = stats[0], stats[1], stats[2], stats[3]
        valid = n_pos > 0
        per_column = -spec.scale / num_contrast  # the reference divides by every contrast row
        loss = keep(per_column * loss_sum, valid)
        coef = keep(per_column * weight, valid)
        prm[0], prm[3], prm[4] = keep(lse, valid), coef, coef * fprime_sum
    return loss, valid, prm


def feature_grads(x, y, prm, num_anchors, num_out, spec: LossSpec, symmetric: bool):
    """Launch the backward kernel(s): float32 ``[num_out, D]``, the total gradient of each
    contrast row (rows below A include their gradient as anchors).

    ``symmetric`` (anchors are every contrast row): one sweep, ``(G + G^T) x / t``.
    Otherwise two sweeps: anchor gradients by anchor blocks, then contrast gradients by
    column blocks (which adds the anchor gradients in its epilogue).
    """
    k, d = x.shape
    a = num_anchors
    kernel = _kernel("grad_kernel")
    block_do = 16 if TritonEngine.interpreter_enabled() else min(max(16, triton.next_power_of_2(d)), 256)
    n_d = triton.cdiv(d, block_do)
    common = dict(K_BUCKET=max(0, math.ceil(math.log2(k))), BLOCK_DO=block_do,
                  **_flags(spec, x), **_tile_args())
    inv_t = 1.0 / spec.temperature
    grad_anchor = torch.empty(a, d, dtype=torch.float32, device=x.device)
    kernel[lambda meta: (triton.cdiv(a, meta["BLOCK_M"]), n_d)](
        x, y, prm, grad_anchor, grad_anchor, a, k, a, d, inv_t, spec.beta, spec.gamma,
        WRT_CONTRAST=False, SYMMETRIC=symmetric, **common)
    if symmetric:
        return grad_anchor
    grad_contrast = torch.empty(num_out, d, dtype=torch.float32, device=x.device)
    kernel[lambda meta: (triton.cdiv(num_out, meta["BLOCK_N"]), n_d)](
        x, y, prm, grad_contrast, grad_anchor, a, k, num_out, d, inv_t, spec.beta, spec.gamma,
        WRT_CONTRAST=True, SYMMETRIC=False, **common)
    return grad_contrast


class TritonEngine:
    """Engine interface used by :class:`fastcon._function.ContrastiveFunction`.

    ``input_dtype`` is the dtype the user's features came in: bfloat16 / float16 select
    half-precision tensor-core products (float32 accumulation); anything else float32.
    """

    name = "triton"
    # One backward sweep with (G + G^T) when anchors are every contrast row; False
    # forces the two-sweep form (kept for tests and comparison).
    symmetric_backward = True

    def __init__(self, input_dtype: torch.dtype | None = None):
        half = input_dtype in (torch.bfloat16, torch.float16)
        self.dot_dtype = input_dtype if half else torch.float32

    @staticmethod
    def interpreter_enabled() -> bool:
        """Whether Triton runs kernels on the CPU interpreter: TRITON_INTERPRET=1 was set
        when the kernels were defined (setting it later changes nothing, so the kernels'
        type is asked rather than the environment)."""
        return type(kernels.row_stats_kernel).__name__ == "InterpretedFunction"

    def _operands(self, z, ref, labels, ref_labels):
        contrast = z if ref is None else torch.cat([z, ref], dim=0)
        y = labels if ref is None else torch.cat([labels, ref_labels])
        # Labels are only compared for equality: their ranks fit in int32, which halves
        # the registers the kernels spend on them.
        y = torch.unique(y, return_inverse=True)[1].to(torch.int32)
        return contrast.to(self.dot_dtype).contiguous(), y.contiguous()

    def _grads(self, z, ref, x, y, prm, num_anchors, spec, need_ref_grad):
        m = z.shape[0]
        num_out = x.shape[0] if (ref is not None and need_ref_grad) else m
        symmetric = self.symmetric_backward and num_anchors == x.shape[0]
        grad_contrast = feature_grads(x, y, prm, num_anchors, num_out, spec, symmetric)
        grad_z = grad_contrast[:m]
        grad_ref = grad_contrast[m:].to(z.dtype) if (ref is not None and need_ref_grad) else None
        return grad_z.to(z.dtype), grad_ref

    def forward(self, z, ref, labels, ref_labels, num_anchors, spec, want_grad, need_ref_grad):
        if z.dtype == torch.float64:
            return self._float64().forward(z, ref, labels, ref_labels, num_anchors, spec, want_grad,
                                           need_ref_grad)
        x, y = self._operands(z, ref, labels, ref_labels)
        stats = row_stats(x, y, num_anchors, spec)
        ones = torch.ones(num_anchors, dtype=torch.float32, device=z.device)
        loss, valid, prm = row_terms(stats, spec, x.shape[0], ones)
        grad_z = grad_ref = None
        if want_grad:
            grad_z, grad_ref = self._grads(z, ref, x, y, prm, num_anchors, spec, need_ref_grad)
        return loss.to(z.dtype), valid, (stats,), grad_z, grad_ref

    def backward(self, z, ref, labels, ref_labels, num_anchors, spec, saved, row_weight, need_ref_grad):
        if z.dtype == torch.float64:
            return self._float64().backward(z, ref, labels, ref_labels, num_anchors, spec, saved, row_weight,
                                            need_ref_grad)
        (stats,) = saved
        x, y = self._operands(z, ref, labels, ref_labels)
        _, _, prm = row_terms(stats, spec, x.shape[0], row_weight.to(torch.float32))
        return self._grads(z, ref, x, y, prm, num_anchors, spec, need_ref_grad)

    @staticmethod
    def _float64():
        from .blockwise import BlockwiseEngine

        return BlockwiseEngine()
