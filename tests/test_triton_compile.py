"""The Triton kernels compile for NVIDIA GPUs (sm_80, sm_90) without a GPU: every loss,
every dot dtype and every constexpr branch goes through Triton's GPU pipeline and
ptxas here, so a kernel that only the interpreter accepts fails in CI rather than on
the first GPU run. (What the kernels compute is checked by the interpreted suite.)
"""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastcon import triton_kernels as kernels  # noqa: E402
from fastcon.triton_engine import _FIXED_CONFIG  # noqa: E402

DOT = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}  # bytes a block may use (A100, H100)
TILES = {k: _FIXED_CONFIG[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
LAUNCH = {"num_warps": _FIXED_CONFIG["num_warps"], "num_stages": _FIXED_CONFIG["num_stages"]}


def _compile(fn, signature, constexprs, arch):
    # pointers 16-byte aligned and sizes multiples of 16, as for D = 128 launches
    ints = [i for i, (name, ty) in enumerate(signature.items()) if ty.startswith("*") or ty == "i32"]
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                        attrs={(i,): [["tt.divisibility", 16]] for i in ints})
    except TypeError as exc:  # the ahead-of-time API of another Triton version
        pytest.skip(f"triton {triton.__version__}: {exc}")
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=LAUNCH)
    assert compiled.asm["cubin"], "no cubin"
    assert compiled.metadata.shared <= SHARED_MEMORY[arch]
    return compiled


def _stats_signature(dt):
    sig = {"x_ptr": f"*{dt}", "y_ptr": "*i32", "stats_ptr": "*fp32", "A": "i32", "K": "i32", "D": "i32",
           "inv_t": "fp32", "beta": "fp32", "gamma": "fp32", "K_BUCKET": "i32"}
    return {**sig, **dict.fromkeys(["LOSS", "FOCAL_TERMS", "BETA_ZERO", "GAMMA_ZERO", "BLOCK_M", "BLOCK_N",
                                    "BLOCK_D", "DOT_PRECISION", "UPCAST_DOT"], "constexpr")}


def _grad_signature(dt):
    sig = {"x_ptr": f"*{dt}", "y_ptr": "*i32", "prm_ptr": "*fp32", "out_ptr": "*fp32", "anchor_grad_ptr": "*fp32",
           "A": "i32", "K": "i32", "num_out": "i32", "D": "i32", "inv_t": "fp32", "beta": "fp32", "gamma": "fp32",
           "K_BUCKET": "i32"}
    return {**sig, **dict.fromkeys(["LOSS", "WRT_CONTRAST", "SYMMETRIC", "BETA_ZERO", "GAMMA_ZERO", "BLOCK_M",
                                    "BLOCK_N", "BLOCK_D", "BLOCK_DO", "DOT_PRECISION", "UPCAST_DOT"], "constexpr")}


LOSS_IDS = {"supcon": 0, "schane": 1, "focal": 2}


# float16 takes the bfloat16 code path (another element type only); sm_80 is checked on
# the tensor-core path. Compiling is slow (about 10 s per combination on 2 cores).
COMBINATIONS = [(loss, dt, 90) for loss in LOSS_IDS for dt in ("fp32", "bf16")] + [("schane", "fp16", 80)]


@pytest.mark.parametrize("loss,dt,arch", COMBINATIONS, ids=[f"{name}-{d}-sm{a}" for name, d, a in COMBINATIONS])
def test_kernels_compile_for_gpu(loss, dt, arch):
    flag_sets = [(False, False), (True, True)]  # (BETA_ZERO, GAMMA_ZERO): both branches of each
    passes = [False, True] if loss == "focal" else [False]
    for focal_terms in passes:
        for beta_zero, gamma_zero in flag_sets:
            _compile(kernels.row_stats_kernel, _stats_signature(dt),
                     dict(LOSS=LOSS_IDS[loss], FOCAL_TERMS=focal_terms, BETA_ZERO=beta_zero, GAMMA_ZERO=gamma_zero,
                          DOT_PRECISION=DOT[dt], UPCAST_DOT=False, **TILES), arch)
    for wrt_contrast, symmetric in [(False, True), (False, False), (True, False)]:
        _compile(kernels.grad_kernel, _grad_signature(dt),
                 dict(LOSS=LOSS_IDS[loss], WRT_CONTRAST=wrt_contrast, SYMMETRIC=symmetric, BETA_ZERO=False,
                      GAMMA_ZERO=False, BLOCK_DO=128, DOT_PRECISION=DOT[dt], UPCAST_DOT=False, **TILES), arch)
