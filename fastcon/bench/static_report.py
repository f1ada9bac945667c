"""The static report's table: the CSV, the H100 model and the summary of
:mod:`fastcon.bench.triton_static` (the criteria are in that module's docstring).

The model times the plain column loops over ``N^2`` similarity elements (N = 65536) on an
H100 of 132 SMs (the SXM part's count) at 1.755 GHz (the PCIe part's boost clock; an SXM part
boosts to 1.98 GHz, where each time is 0.89x), three ways, each a lower bound:

- **issue**: thread-instructions per element / (132 SMs x 4 schedulers x 32 lanes per clock);
- **exponential**: MUFU instructions (``ex2``, ``lg2``, ``rcp``) per element / (132 SMs x 16 per
  clock): four special-function lanes per scheduler, eight cycles per warp instruction;
- **tensor core**: the kernel's ``N^2 x DP`` products (one in the statistics kernel, two in
  the gradient's) / (132 SMs x 4096 dense half-precision flops per clock), for half-precision
  rows (float32 rows are multiplied on the FMA pipes, counted in the issue bound).

and reads the occupancy from the cubin: registers per thread (its ``.nv.info``) and shared
memory per CTA give the CTAs resident per SM, which says how many warps each scheduler has to
hide the latency of one warp's HGMMA wait.
"""

from __future__ import annotations

import csv
import os

from ..losses import DEFINITIONS

LOSSES = ("supcon", "schane", "focal")
N_MODEL = 65536
H100 = {"sms": 132, "schedulers": 4, "lanes": 32, "hz": 1.755e9, "mufu_per_clock": 16, "tc_flops_per_clock": 4096}
# Per SM: registers, shared memory (the opt-in carve-out; each CTA also takes 1 KiB the system
# reserves), resident warps and CTAs; registers are allocated per warp in units of 256.
SM_LIMITS = {
    "sm_90": {"registers": 65536, "shared": 233472, "reserved_shared": 1024, "warps": 64, "ctas": 32},
    "sm_80": {"registers": 65536, "shared": 167936, "reserved_shared": 1024, "warps": 64, "ctas": 32},
}
REGISTER_UNIT = 256
PRODUCTS = {"stats": 1, "grad": 2}  # N^2 x DP tensor-core products per kernel
LIMIT_INSTR_PER_ELEM = 28.0  # SupCon forward + backward, sm_90 bf16 D=128, fixed configurations
COLUMNS = ("loss", "kernel", "dtype", "arch", "D", "config", "shipped", "registers", "spill_bytes", "stack_bytes",
           "shared_bytes", "smem_fits", "tensor_core_instr", "loops", "plain_pipelined", "plain_instr",
           "plain_local_mem_instr", "instr_per_elem", "mufu_per_elem", "all_loops_instr_per_elem", "ctas_per_sm",
           "occupancy_limit", "model_ms_n65536", "model_exp_ms_n65536", "model_tensor_core_ms_n65536", "note")


def model_ms(instr_per_elem, n=N_MODEL):
    """Issue-bound time (ms) of ``instr_per_elem`` thread-instructions per element over ``n^2``."""
    lanes_per_s = H100["sms"] * H100["schedulers"] * H100["lanes"] * H100["hz"]
    return 1e3 * instr_per_elem * n * n / lanes_per_s


def model_exp_ms(mufu_per_elem, n=N_MODEL):
    """Special-function-unit bound (ms): ``mufu_per_elem`` MUFU instructions per element over ``n^2``."""
    return 1e3 * mufu_per_elem * n * n / (H100["sms"] * H100["mufu_per_clock"] * H100["hz"])


def model_tensor_core_ms(kernel, dp, n=N_MODEL):
    """Tensor-core bound (ms) of ``kernel``'s ``n^2 x dp`` products at the dense half-precision rate."""
    flops = PRODUCTS[kernel] * 2.0 * n * n * dp
    return 1e3 * flops / (H100["sms"] * H100["tc_flops_per_clock"] * H100["hz"])


def ctas_per_sm(arch, registers, warps, shared_bytes):
    """``(CTAs resident per SM, what limits them)`` for a kernel of ``warps`` warps using
    ``registers`` per thread and ``shared_bytes`` of shared memory per CTA."""
    lim = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    bounds = {"registers": (lim["registers"] // per_warp) // warps,
              "shared memory": lim["shared"] // (shared_bytes + lim["reserved_shared"]),
              "warps": lim["warps"] // warps, "CTAs": lim["ctas"]}
    limit = min(bounds, key=bounds.get)
    return bounds[limit], limit


def write_csv(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def fixed_pairs(rows):
    """``{(loss, arch, dtype, D): {"stats": row, "grad": row}}``: the fixed configurations."""
    out = {}
    for r in rows:
        if r.get("shipped") == "fixed+autotune" and r.get("instr_per_elem") not in (None, ""):
            out.setdefault((r["loss"], r["arch"], r["dtype"], int(r["D"])), {})[r["kernel"]] = r
    return out


def pair_sums(rows):
    """``{(loss, arch, dtype, D): (stats, grad)}`` instr/elem of the fixed configurations."""
    return {key: tuple(float(pair[k]["instr_per_elem"]) if k in pair else None for k in ("stats", "grad"))
            for key, pair in fixed_pairs(rows).items()}


def pair_model(pair):
    """The model of a fixed forward + backward pair: ``{"issue", "exp", "tensor_core"}`` ms (None
    where a row lacks the figure) and the CTAs per SM of each kernel."""
    def total(column):
        values = [pair[k].get(column) for k in ("stats", "grad")]
        return None if any(v in (None, "") for v in values) else sum(float(v) for v in values)

    return {"issue": total("model_ms_n65536"), "exp": total("model_exp_ms_n65536"),
            "tensor_core": total("model_tensor_core_ms_n65536"),
            "ctas": "/".join(str(pair[k].get("ctas_per_sm") or "?") for k in ("stats", "grad"))}


def problems(rows):
    """Spills, unpipelined plain loops and shared memory beyond the architecture's limit."""
    found = []
    for r in rows:
        what = f"{r['kernel']} {r['loss']} {r['arch']} {r['dtype']} D={r['D']} {r['config']}"
        if str(r.get("spill_bytes", "0") or "0") not in ("0", ""):
            found.append(f"spill {r['spill_bytes']} B: {what}")
        if r.get("kernel") in ("stats", "grad") and str(r.get("plain_pipelined", "")) == "False":
            found.append(f"plain loop not pipelined: {what}")
        if str(r.get("smem_fits", "")) == "False":
            found.append(f"shared memory {r['shared_bytes']} B over the {r['arch']} limit: {what}")
    return found


CLASSES = (2, 10, 100)


def _loops(row):
    return {k: float(v) for k, v in (part.split(":") for part in row["all_loops_instr_per_elem"].split())}


def class_weighted(rows, d=128, classes=CLASSES):
    """``{(arch, dtype, D, loss): ratio to SupCon per C}``: forward + backward instr/elem of the
    fixed configurations counting every column loop, for ``C`` balanced classes. A block's class
    range is about ``1/C`` of the columns: every loss's positive loop runs over it as well as
    the plain loop over everything, except where the dense part runs over negatives only
    (SCHaNe): the kernels' plain loop then leaves the class range to the masked ("special")
    loop. The self band and the tail (``O(N BM)``) are left out."""
    totals = {}
    for r in rows:
        if r.get("shipped") != "fixed+autotune" or r.get("kernel") not in ("stats", "grad") \
                or int(r["D"]) != d or not r.get("all_loops_instr_per_elem"):
            continue
        loops = _loops(r)
        key = (r["arch"], r["dtype"], d, r["loss"])
        per = totals.setdefault(key, [0.0] * len(classes))
        negatives_only = DEFINITIONS[r["loss"]].dense_over == "negatives"  # the kernels' class band
        for i, c in enumerate(classes):
            f = 1.0 / c
            if negatives_only:
                per[i] += loops["plain"] * (1 - f) + (loops["special"] + loops["positive"]) * f
            else:
                per[i] += loops["plain"] + loops["positive"] * f
    out = {}
    for key, per in totals.items():
        base = totals.get(key[:3] + ("supcon",))
        if base is not None and per is not base:
            out[key] = [x / y for x, y in zip(per, base)]
    return out


def summary(rows):
    """The text table: forward + backward instr/elem of the fixed configurations, the H100 model
    at N = 65536 (issue, exponential and tensor-core bounds; CTAs per SM of the statistics /
    gradient kernels), and each loss's ratio to SupCon."""
    pairs = fixed_pairs(rows)
    sums = pair_sums(rows)
    lines = [f"{'arch':6s} {'dtype':9s} {'D':>4s} {'loss':7s} {'fwd':>6s} {'bwd':>6s} {'fwd+bwd':>8s} "
             f"{'issue ms':>8s} {'exp ms':>7s} {'TC ms':>6s} {'CTAs/SM':>7s} {'/SupCon':>8s}"]

    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    for (loss, arch, dtype, d), (s, g) in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3],
                                                                                LOSSES.index(kv[0][0]))):
        if s is None or g is None:
            continue
        base = sums.get(("supcon", arch, dtype, d), (None, None))
        ratio = f"{(s + g) / (base[0] + base[1]):8.2f}" if None not in base else f"{'':8s}"
        m = pair_model(pairs[(loss, arch, dtype, d)])
        issue = m["issue"] if arch == "sm_90" else None
        lines.append(f"{arch:6s} {dtype:9s} {d:4d} {loss:7s} {s:6.2f} {g:6.2f} {s + g:8.2f} {ms(issue):>8s} "
                     f"{ms(m['exp']):>7s} {ms(m['tensor_core']):>6s} {m['ctas']:>7s} {ratio}")
    weighted = class_weighted(rows)
    if weighted:
        lines.append(f"all three loops, C balanced classes (the class range is 1/C of the columns), "
                     f"ratio to SupCon at C = {' / '.join(map(str, CLASSES))}:")
        for (arch, dtype, d, loss), ratios in sorted(weighted.items()):
            lines.append(f"  {arch:6s} {dtype:9s} {d:4d} {loss:7s} " + " / ".join(f"{x:.2f}" for x in ratios))
    found = problems(rows)
    lines.append("problems: " + ("none" if not found else ""))
    lines += [f"  {p}" for p in found]
    return "\n".join(lines)
