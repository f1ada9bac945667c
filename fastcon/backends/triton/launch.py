"""Launching the Triton kernels: tile configurations, the autotuner, the grid and the
split of the column range, with no host synchronisation.

Configurations: a list per kernel chosen by the padded feature size DP, the dot dtype, the
GPU's compute capability (asked once per device, host-side: no synchronisation) and, where a
tile holds for one loss and spills for another, the loss; see
:func:`shipped_configs`. ``FASTCON_TRITON_AUTOTUNE=0`` runs the list's first entry (bitwise
identical results across processes); otherwise the autotuner picks from the list (one
autotuner per list). Every entry compiles without register spills on sm_80 and sm_90 for
D in {64, 100, 128, 256}, in bfloat16, float16 and float32 (``benchmarks/triton_static.py``;
float32 has one configuration per D). The autotuner keys on everything that changes the
best configuration: a bucket of the two sizes, the padded feature size, the dot precision,
the loss and every constexpr flag (dtypes are keyed by Triton).
"""

from __future__ import annotations

import math
import os

import torch
import triton

from . import kernels

MAX_DP = 256  # widest padded feature size the kernels hold in one tile
# rows and warps per program of the preparation kernel (spill-free on sm_80 and sm_90 for every
# dtype and D the static report compiles; 16 rows with 4 warps spill at D = 100 on sm_90)
PREP_BLOCK_R, PREP_WARPS = 16, 8
# (BM, BN, num_warps, num_stages) per kernel. The first entry of each list is the fixed
# configuration (FASTCON_TRITON_AUTOTUNE=0); the list is the autotuner's candidates. Every
# entry compiles without register spills for SupCon, SCHaNe and focal SupCon in bfloat16,
# float16 and float32 on sm_80 and sm_90 at the D the list serves (benchmarks/triton_static.py; the
# gradient's d < D epilogue mask makes D = 100 a separate check from D = 128).
_STATS = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3))
# DP = 256: 128x128 is over the shared memory of both targets, 64x128 spills on sm_80
_STATS_256 = ((128, 64, 8, 3), (64, 64, 4, 3))
# 64x128 spills (SCHaNe on sm_80, focal on sm_90)
_GRAD_64 = ((64, 64, 4, 2), (64, 32, 4, 3))
# DP = 128 on sm_90: the 64x64 tile holds bfloat16 within 255 registers (SupCon 10.9
# instructions per element, 32x64: 17.6), and SupCon's float16 too, but spills for SCHaNe and
# focal in float16 (8 to 40 B, and 64x64 with 8 warps costs 32 / 22 per element), which take
# 64x32 (SCHaNe 18.4, focal 13.7; 32x64: 20.9 / 17.6)
_GRAD_128_SM90 = ((64, 64, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2))
_GRAD_128_SM90_FP16 = ((64, 32, 4, 3), (32, 64, 4, 2))
_GRAD_128_SM90_FP16_BY_LOSS = {"supcon": _GRAD_128_SM90}  # the losses whose 64x64 float16 tile holds
# DP = 128 on sm_80: every 64-row, 4-warp tile spills at D = 100 (and SCHaNe's at D = 128)
_GRAD_128_SM80 = ((32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 4, 2))
# DP = 256: the [BM, 256] float32 accumulator takes 32-row tiles
_GRAD_256 = ((32, 64, 4, 2), (32, 64, 4, 3), (32, 32, 4, 3))
# float32 (exact FMA products, no tensor cores): small tiles (the half-precision 128x64 and
# 64x64 tiles spill 0.2 to 167 KB); at DP = 128 on sm_90, 16x32 spills with 4 warps, not 8
_FP32_64 = ((32, 32, 4, 2),)
_FP32_128 = ((16, 32, 8, 2),)
_FP32_256 = ((16, 32, 4, 2),)
_FLAGS = ["LOSS", "HAS_SELF", "SYMMETRIC", "BETA_ZERO", "BETA_ONE", "GAMMA_ZERO", "GAMMA_ONE", "DP", "DOT_PRECISION"]
KEYS = {
    "stats": ["size_key", "WITH_DENSE", "WITH_POSITIVE", "NUM_DENSE", "BETA_NEG"] + _FLAGS,
    "grad": ["size_key", "ROW_PARAMS", "COL_PARAMS", "NUM_PARAMS", "PARTIAL", "NORMALIZE", "HAS_EXTRA",
             "HAS_REF_OUT"] + _FLAGS,
}
_tuned = {}


def shipped_configs(name: str, dp: int, dtype: str, major: int, loss: str = "supcon") -> tuple:
    """The configurations of kernel ``name`` (``stats`` or ``grad``) for padded feature size
    ``dp``, dot dtype ``dtype`` (``bfloat16``, ``float16`` or ``float32``), compute
    capability major ``major`` (9 and above: the sm_90 lists, below: sm_80's) and loss (a
    definition's ``name``); the first is the fixed one. Pure: the static report asks it for
    targets this machine does not have."""
    if dtype == "float32":
        return _FP32_64 if dp <= 64 else (_FP32_128 if dp <= 128 else _FP32_256)
    if name == "stats":
        return _STATS_256 if dp > 128 else _STATS
    if dp > 128:
        return _GRAD_256
    if dp <= 64:
        return _GRAD_64
    if major < 9:
        return _GRAD_128_SM80
    if dtype == "float16":
        return _GRAD_128_SM90_FP16_BY_LOSS.get(loss, _GRAD_128_SM90_FP16)
    return _GRAD_128_SM90


_MAJOR = {}


def _major(device: torch.device) -> int:
    """Compute capability major of ``device`` (None: the current one), asked once per device
    (no GPU synchronisation)."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    if index not in _MAJOR:
        _MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _MAJOR[index]


def _selection(name: str, dp: int, dtype: torch.dtype, device: torch.device, loss: str) -> tuple:
    return shipped_configs(name, dp, str(dtype).replace("torch.", ""), _major(device), loss)


def interpreter_enabled() -> bool:
    """Whether the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1 was set when they
    were defined; setting it later changes nothing, so the kernels' type is asked)."""
    return type(kernels.stats_kernel).__name__ == "InterpretedFunction"


def _autotune() -> bool:
    return not interpreter_enabled() and os.environ.get("FASTCON_TRITON_AUTOTUNE", "1") != "0"


def _config(shape):
    bm, bn, warps, stages = shape
    return triton.Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=stages)


def kernel(name: str, dp: int = 0, dtype: torch.dtype = None, device: torch.device = None, loss: str = "supcon"):
    """``stats`` or ``grad``, wrapped on a GPU in the autotuner over the configurations of
    ``dp``, ``dtype``, ``device``'s architecture and ``loss`` (one autotuner per list; each
    keys on DP, the dot precision and the loss too)."""
    configs = _selection(name, dp, dtype, device, loss) if _autotune() else None
    if (name, configs) not in _tuned:
        fn = getattr(kernels, f"{name}_kernel")
        if configs is not None:
            fn = triton.autotune(configs=[_config(c) for c in configs], key=KEYS[name])(fn)
        _tuned[(name, configs)] = fn
    return _tuned[(name, configs)]


def tile_args(name: str, dp: int = 0, dtype: torch.dtype = None, device: torch.device = None,
              loss: str = "supcon") -> dict:
    """Launch arguments the autotuner would otherwise choose: the fixed configuration."""
    if interpreter_enabled():
        t = int(os.environ.get("FASTCON_TRITON_TILE", "16"))
        return {"BM": t, "BN": t}
    if _autotune():
        return {}
    bm, bn, warps, stages = _selection(name, dp, dtype, device, loss)[0]
    return {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}


def size_key(n_own: int, n_other: int) -> int:
    """Power-of-two buckets of the sizes: a new batch size reuses its bucket's tuning."""
    return 64 * max(0, math.ceil(math.log2(max(n_own, 1)))) + max(0, math.ceil(math.log2(max(n_other, 1))))


def num_splits(n_own: int, n_other: int, device: torch.device) -> int:
    """Column splits (the second grid axis) so that few own blocks still fill the GPU."""
    if interpreter_enabled():
        return int(os.environ.get("FASTCON_TRITON_SPLITS", "1"))
    sms = _sm_count(device)
    blocks = triton.cdiv(max(n_own, 1), 128)
    if blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, blocks), triton.cdiv(n_other, 64) // 4, 64))


_SMS = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def dot_flags(dot_dtype: torch.dtype) -> dict:
    """float32 rows are multiplied exactly (no TF32); half rows on tensor cores (float32 sums)."""
    exact = dot_dtype == torch.float32
    return {"DOT_PRECISION": "ieee" if exact else "tf32", "UPCAST_DOT": interpreter_enabled() and not exact}


def loss_flags(definition) -> dict:
    k = definition.kernel_scalars()
    return {"LOSS": definition.kernel_id, "BETA_ZERO": k["beta"] == 0.0, "BETA_ONE": k["beta"] == 1.0,
            "GAMMA_ZERO": k["gamma"] == 0.0, "GAMMA_ONE": k["gamma"] == 1.0}


def padded_dim(d: int) -> int:
    """Feature size padded to a power of two of at least 16: a multiple of 16 (aligned rows, whole
    tensor-core steps) that Triton tiles can take whole."""
    return max(16, triton.next_power_of_2(d))
