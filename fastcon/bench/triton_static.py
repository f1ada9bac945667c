"""Static report of the shipped Triton kernels, compiled for sm_90 and sm_80 without a GPU.

Every shipped configuration (``launch.shipped_configs``: the list for each padded D, dtype
and target, the first entry the fixed one) of the statistics and gradient kernels, and the
row preparation kernel, is compiled with ``triton.compile`` for each loss, dtype and D,
specialised as the single-device launch in :mod:`fastcon.backends.triton.sides` specialises
it (every row an anchor, normalised rows, one column split: N = 65536 on an H100). Read from
the result: registers and spill bytes (ptxas -v), tensor-core instructions (SASS), whether the
plain column loop is pipelined, and the thread-instructions per similarity element of the
plain loop:

    instr/elem = (SASS instructions from the loop's label to its backward branch) * 32 * warps
                 / (BM * BN)        # elements of one iteration (BN / 2 in the gradient's positive loop)

**Pipelined**: the loop body issues asynchronous global-to-shared copies (LDGSTS = cp.async,
UTMALDG = TMA, UBLKCP): Triton emits them only when its software pipeliner multi-buffers the
loop's loads (``num_stages > 1``), so the next tile is in flight while this one is computed
(an unpipelined loop loads with LDG + STS and waits). The TTGIR is checked too: the
``scf.for`` holds ``ttg.async_copy_global_to_local``.

**Model** (H100, N = 65536, plain loops only: the band, tail and positive tiles are O(N * BM)
work; see :mod:`.static_report`): the issue bound instr/elem * N^2 / (132 SMs * 4 schedulers *
32 lanes * 1.755e9 Hz), the exponential bound MUFU/elem * N^2 / (132 SMs * 16 * 1.755e9 Hz),
the tensor-core bound of the kernel's N^2 * DP products, and the CTAs resident per SM from the
cubin's registers per thread and the kernel's shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from . import sass
from .static_report import (LOSSES, N_MODEL, PRODUCTS, ctas_per_sm, model_exp_ms, model_ms, model_tensor_core_ms,
                            summary, write_csv)

ARCHS = {"sm_90": 90, "sm_80": 80}
DTYPES = ("bfloat16", "float16", "float32")
DIMS = (64, 100, 128, 256, 768)
SMEM_LIMIT = {"sm_90": 232448, "sm_80": 166912}  # opt-in shared memory per block
# float32 products are unrolled FMAs (no tensor cores): ptxas takes minutes per kernel at
# D >= 128, so by default float32 is compiled in the fixed configurations at these D only
FP32_DIMS = (64, 128, 768)
QUICK = (("sm_90", "bfloat16", 128), ("sm_80", "float16", 100))
PTXAS_TIMEOUT_S = 300  # a shipped configuration that ptxas cannot finish in 5 min is reported
UNAVAILABLE = "triton cannot compile for CUDA here"


def launch_values(kernel, loss, dtype, d, config):
    """Argument values of one launch (CPU tensors stand in for the GPU's: same dtypes and
    alignment), as :mod:`fastcon.backends.triton.sides` passes them."""
    import torch

    from ..backends.triton import launch
    from ..losses import DEFINITIONS

    user = getattr(torch, dtype)
    dot = user if user in (torch.bfloat16, torch.float16) else torch.float32
    dp = launch.padded_dim(d)
    x, feat = torch.empty(16, dp, dtype=dot), torch.empty(16, d, dtype=user)
    i32, i64, f32 = (torch.empty(16, dtype=t) for t in (torch.int32, torch.int64, torch.float32))
    n, key = N_MODEL, launch.size_key(N_MODEL, N_MODEL)
    if kernel == "prep_rows":  # features [N/2, 2 views, D], contiguous; no ref rows; every row an anchor
        return dict(feat_ptr=feat, ref_ptr=feat, order_ptr=i64, y_ptr=i64, n_labelled=n, cls_y_ptr=i64, n_cls=n,
                    range_y_ptr=i64, n_range=n, steps=n.bit_length() + 1, x_ptr=x, inv_ptr=f32, cls_ptr=i32,
                    lo_ptr=i32, hi_ptr=i32, where_ptr=i32, self_where_ptr=i32, pos_ptr=i32, other_pos_ptr=i32,
                    out_off_ptr=i64, ref_off_ptr=i64, n=n, M=n, B=n // 2, D=d, stride_b=2 * d, stride_v=d,
                    stride_d=1, stride_r=0, stride_rd=0, NORMALIZE=True, HAS_REF=False, WRITE_WHERE=False,
                    INIT_POS=False, SELF_FROM=False, OFFSETS=True, BLOCK_R=launch.PREP_BLOCK_R, DP=dp, BLOCK_DP=dp)
    definition = DEFINITIONS[loss]()
    k = definition.kernel_scalars()
    bm, bn, _, _ = config
    common = dict(own_ptr=x, other_ptr=x, own_cls_ptr=i32, other_cls_ptr=i32, own_pos_ptr=i32, pos_lo_ptr=i32,
                  pos_hi_ptr=i32, n_own=n, n_other=n, num_splits=1, c1=1.4426950408889634 / definition.temperature,
                  inv_t=1.0 / definition.temperature, beta=k["beta"], gamma=k["gamma"], HAS_SELF=True,
                  SYMMETRIC=True, DP=dp, BM=bm, BN=bn, size_key=key, **launch.loss_flags(definition),
                  **launch.dot_flags(dot))
    common["UPCAST_DOT"] = False  # compiled for a GPU, never the interpreter
    if kernel == "stats":
        return dict(common, dense_in_ptr=f32, out_ptr=f32, WITH_DENSE=True, WITH_POSITIVE=True,
                    NUM_DENSE=len(definition.dense_slots), BETA_NEG=k["beta"] < 0)
    return dict(common, own_prm_ptr=f32, other_prm_ptr=f32, partial_ptr=f32, inv_norm_ptr=f32, out_off_ptr=i64,
                ref_off_ptr=i64, extra_ptr=f32, extra_idx_ptr=i32, scale_ptr=f32, out_ptr=feat, feat_ptr=feat,
                ref_out_ptr=f32, ref_ptr=f32, ROW_PARAMS=True, COL_PARAMS=True,
                NUM_PARAMS=len(definition.param_slots), PARTIAL=False, NORMALIZE=True, HAS_EXTRA=False,
                HAS_REF_OUT=False, D=d)


def compile_kernel(fn, values, arch, warps, stages):
    """``triton.compile`` of ``fn`` specialised on ``values`` as the JIT launcher would (ints
    of 1 become constants, multiples of 16 and aligned pointers get divisibility hints);
    returns the compiled kernel and the ptxas log."""
    import triton
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", ARCHS[arch], 32)  # the driver's target: warp size 32
    backend = make_backend(target)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(type(backend), v, False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options={"num_warps": warps, "num_stages": stages})
    return compiled, log.getvalue()


def analyse(job):
    """One CSV row: compile ``job = (kernel, loss, dtype, arch, d, config, shipped)`` and read it."""
    from ..backends.triton import kernels, launch, rows

    kernel, loss, dtype, arch, d, config, shipped = job
    row = dict(loss=loss, kernel=kernel, dtype=dtype, arch=arch, D=d, shipped=shipped, note="")
    if launch.padded_dim(d) > launch.MAX_DP:
        row.update(config="-", note=f"fallback: DP={launch.padded_dim(d)} > {launch.MAX_DP}, the blockwise "
                                    "engine runs it (no Triton kernel)")
        return row
    fn = rows.prep_side_kernel if kernel == "prep_rows" else getattr(kernels, f"{kernel}_kernel")
    bm, bn, warps, stages = config if config else (16, 0, launch.PREP_WARPS, 3)  # prep: Triton's default stages
    row["config"] = f"{bm}x{bn} w{warps} s{stages}" if config else f"BLOCK_R={launch.PREP_BLOCK_R} w{warps} s{stages}"
    compiled, log = compile_kernel(fn, launch_values(kernel, loss, dtype, d, config), arch, warps, stages)
    row.update(sass.ptxas_resources(log))
    cubin = compiled.asm["cubin"]
    if sass.cubin_registers(cubin) != row["registers"]:
        raise ValueError(f"the cubin holds {sass.cubin_registers(cubin)} registers, ptxas said {row['registers']}")
    if row["spill_bytes"]:
        row["note"] = "ptxas: " + " ".join(ln.split(":", 1)[-1].strip() for ln in log.splitlines() if "Used" in ln)
    row["shared_bytes"] = compiled.metadata.shared
    row["smem_fits"] = compiled.metadata.shared <= SMEM_LIMIT[arch]
    row["ctas_per_sm"], row["occupancy_limit"] = ctas_per_sm(arch, row["registers"], warps, compiled.metadata.shared)
    instructions, loops = sass.parse_sass(sass.disassemble(cubin))
    row["tensor_core_instr"] = sass.tensor_core_count(instructions)
    row["loops"] = len(loops)
    if kernel == "prep_rows" or not loops:
        return row
    names = ("plain", "special", "positive") if len(loops) == 3 else tuple(f"loop{i}" for i in range(len(loops)))
    per = []
    for name, loop in zip(names, loops):
        cols = bn // 2 if (kernel == "grad" and name == "positive") else bn
        per.append((name, len(loop.instructions) * 32 * warps / (bm * cols)))
    plain = loops[0]
    ttgir_async = sass.ttgir_loops(compiled.asm["ttgir"])
    row["plain_pipelined"] = plain.async_copies > 0 and bool(ttgir_async) and ttgir_async[0]
    row["plain_instr"] = len(plain.instructions)
    row["plain_local_mem_instr"] = plain.count(("LDL", "STL"))
    row["instr_per_elem"] = round(per[0][1], 3)
    mufu_per_elem = plain.count(sass.MUFU_OPS) * 32 * warps / (bm * bn)
    row["mufu_per_elem"] = round(mufu_per_elem, 3)
    row["all_loops_instr_per_elem"] = " ".join(f"{k}:{v:.2f}" for k, v in per)
    if arch == "sm_90":
        row["model_ms_n65536"] = round(model_ms(per[0][1]), 3)
        row["model_exp_ms_n65536"] = round(model_exp_ms(mufu_per_elem), 3)
        if kernel in PRODUCTS and dtype != "float32":
            row["model_tensor_core_ms_n65536"] = round(model_tensor_core_ms(kernel, launch.padded_dim(d)), 3)
    return row


def plan(quick=False, losses=LOSSES, dims=DIMS, fp32_dims=FP32_DIMS, dtypes=DTYPES, fp32_all=False):
    """The jobs: every loss, kernel, dtype, arch, D and shipped configuration (``quick``: SupCon
    in :data:`QUICK`; float32 only at ``fp32_dims`` and, unless ``fp32_all``, in the fixed
    configurations). The row preparation kernel does not depend on the loss (loss ``any``);
    a D the kernels do not take gets one row per kernel."""
    from ..backends.triton import launch

    if quick:
        cases, losses = QUICK, ("supcon",)
    else:
        cases = [(a, t, d) for a in ARCHS for t in dtypes for d in dims if t != "float32" or d in fp32_dims]
    jobs = []
    for arch, dtype, d in cases:
        jobs.append(("prep_rows", "any", dtype, arch, d, None, "always"))
        for loss in losses:
            for kernel in ("stats", "grad"):
                if launch.padded_dim(d) > launch.MAX_DP:
                    jobs.append((kernel, loss, dtype, arch, d, None, "-"))
                    continue
                configs = launch.shipped_configs(kernel, launch.padded_dim(d), dtype, ARCHS[arch] // 10, loss)
                for c in configs:
                    if dtype == "float32" and not fp32_all and tuple(c) != tuple(configs[0]):
                        continue
                    shipped = "fixed+autotune" if tuple(c) == tuple(configs[0]) else "autotune"
                    jobs.append((kernel, loss, dtype, arch, d, tuple(c), shipped))
    return jobs


def _cost(job):
    """Rough compile cost, to start the slow jobs first: float32 products are unrolled FMAs."""
    kernel, _, dtype, _, d, config, _ = job
    return (dtype == "float32") * 100 * d + (config[0] * config[1] if config else 0) * d / 1000


def cuda_compile_unavailable():
    """None when Triton compiles for CUDA here (no GPU needed), else why not."""
    try:
        from ..backends.triton import rows

        compile_kernel(rows.prep_side_kernel, launch_values("prep_rows", "any", "float16", 16, None), "sm_80", 4, 1)
    except Exception as e:  # noqa: BLE001 - any failure means no CUDA compilation here
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def _same_code(job):
    """Jobs that compile to one kernel share a key: the statistics kernel reads DP, not D."""
    from ..backends.triton import launch

    kernel, loss, dtype, arch, d, config, shipped = job
    return (kernel, loss, dtype, arch, launch.padded_dim(d) if kernel == "stats" else d, config)


def _analyse_or_note(job):
    try:
        return analyse(job)
    except Exception as e:  # a compile that fails or times out is reported, not fatal
        kernel, loss, dtype, arch, d, config, shipped = job
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "error code 124" in str(e):
            why = "ptxas did not finish within the time limit"
        return dict(loss=loss, kernel=kernel, dtype=dtype, arch=arch, D=d, shipped=shipped,
                    config="-" if config is None else "{}x{} w{} s{}".format(*config), note=f"not compiled: {why}")


def run(jobs, workers=2, ptxas_timeout_s=PTXAS_TIMEOUT_S):
    """Rows of every job, in the jobs' order (compiled in ``workers`` processes; jobs that
    compile to the same code are compiled once)."""
    folder = tempfile.mkdtemp(prefix="fastcon-static-")
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_PTXAS_PATH", "TRITON_INTERPRET")}
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "cache")
    os.environ["TRITON_PTXAS_PATH"] = sass.ptxas_with_timeout(folder, ptxas_timeout_s)
    os.environ.pop("TRITON_INTERPRET", None)
    unique = sorted({_same_code(j): j for j in reversed(jobs)}.values(), key=_cost, reverse=True)
    try:
        if workers <= 1:
            done = [_analyse_or_note(j) for j in unique]
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                done = []
                for r in pool.map(_analyse_or_note, unique, chunksize=1):
                    done.append(r)
                    if len(done) % 20 == 0 or len(done) == len(unique):
                        print(f"compiled {len(done)}/{len(unique)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    by_key = {_same_code(j): r for j, r in zip(unique, done)}
    rows = []
    for j in jobs:
        first = by_key[_same_code(j)]
        r = dict(first, D=j[4], shipped=j[6])
        if r["D"] != first["D"]:
            r["note"] = f"{first.get('note') or ''} same code as D={first['D']} (the kernel reads DP only)".strip()
        rows.append(r)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="SupCon, sm_90 bf16 D=128 and sm_80 fp16 D=100")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "triton_static.csv"))
    parser.add_argument("--dims", nargs="+", type=int, default=list(DIMS))
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--fp32-dims", nargs="+", type=int, default=list(FP32_DIMS),
                        help="the D values compiled for float32 (default: %(default)s)")
    parser.add_argument("--fp32-all-configs", action="store_true",
                        help="float32 in every shipped configuration too (slow: minutes per kernel)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--summary", metavar="CSV", help="print the summary of a written CSV and exit")
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.summary, newline="") as f:
            print(summary(list(csv.DictReader(f))))
        return 0
    why = cuda_compile_unavailable()
    if why is not None:
        print(f"{UNAVAILABLE}: {why}")
        return 3
    start = time.time()
    jobs = plan(args.quick, tuple(args.losses), tuple(args.dims), tuple(args.fp32_dims), tuple(args.dtypes),
                args.fp32_all_configs)
    rows = run(jobs, args.workers)
    write_csv(rows, args.out)
    print(summary(rows))
    print(f"wrote {len(rows)} rows to {args.out} in {(time.time() - start) / 60:.1f} min")
    return 0

if __name__ == "__main__":
    sys.exit(main())
