"""The static report's table: the CSV, the issue-time model and the summary of
:mod:`fastcon.bench.triton_static` (the criteria are in that module's docstring)."""

from __future__ import annotations

import csv
import os

from ..losses import DEFINITIONS

LOSSES = ("supcon", "schane", "focal")
N_MODEL = 65536
H100 = {"sms": 132, "schedulers": 4, "lanes": 32, "hz": 1.755e9}
LIMIT_INSTR_PER_ELEM = 28.0  # SupCon forward + backward, sm_90 bf16 D=128, fixed configurations
COLUMNS = ("loss", "kernel", "dtype", "arch", "D", "config", "shipped", "registers", "spill_bytes", "stack_bytes",
           "shared_bytes", "smem_fits", "tensor_core_instr", "loops", "plain_pipelined", "plain_instr",
           "plain_local_mem_instr", "instr_per_elem", "all_loops_instr_per_elem", "model_ms_n65536", "note")


def model_ms(instr_per_elem, n=N_MODEL):
    """Issue-bound time (ms) of ``instr_per_elem`` thread-instructions per element over ``n^2``."""
    lanes_per_s = H100["sms"] * H100["schedulers"] * H100["lanes"] * H100["hz"]
    return 1e3 * instr_per_elem * n * n / lanes_per_s


def write_csv(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def pair_sums(rows):
    """``{(loss, arch, dtype, D): (stats, grad)}`` instr/elem of the fixed configurations."""
    out = {}
    for r in rows:
        if r.get("shipped") == "fixed+autotune" and r.get("instr_per_elem") not in (None, ""):
            key = (r["loss"], r["arch"], r["dtype"], int(r["D"]))
            stats, grad = out.get(key, (None, None))
            if r["kernel"] == "stats":
                stats = float(r["instr_per_elem"])
            else:
                grad = float(r["instr_per_elem"])
            out[key] = (stats, grad)
    return out


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
    at N = 65536, and each loss's ratio to SupCon."""
    sums = pair_sums(rows)
    lines = [f"{'arch':6s} {'dtype':9s} {'D':>4s} {'loss':7s} {'fwd':>6s} {'bwd':>6s} {'fwd+bwd':>8s} "
             f"{'H100 ms':>8s} {'/SupCon':>8s}"]
    for (loss, arch, dtype, d), (s, g) in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3],
                                                                                LOSSES.index(kv[0][0]))):
        if s is None or g is None:
            continue
        base = sums.get(("supcon", arch, dtype, d), (None, None))
        ratio = f"{(s + g) / (base[0] + base[1]):8.2f}" if None not in base else f"{'':8s}"
        ms = f"{model_ms(s + g):8.2f}" if arch == "sm_90" else f"{'-':>8s}"
        lines.append(f"{arch:6s} {dtype:9s} {d:4d} {loss:7s} {s:6.2f} {g:6.2f} {s + g:8.2f} {ms} {ratio}")
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
