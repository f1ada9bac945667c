"""Times fastcon's Triton backend on a CUDA GPU: SupCon, SCHaNe and focal SupCon,
forward + backward, at N = 8192 and 65536, D = 128, bfloat16, against the dense
reference backend at N = 8192. Prints a table, checks the targets, and
writes ``benchmarks/results/triton_<gpu name>.csv`` (the CSV schema of ``fastcon bench``).

    python benchmarks/bench_triton_gpu.py

The first calls of each shape compile and autotune the kernels; they are warm-up and
not timed. "peak extra" is the peak allocated memory during fwd+bwd beyond the inputs
and their gradient.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import fastcon  # noqa: E402
import fastcon.functional as FC  # noqa: E402
from fastcon.bench.measure import quantile  # noqa: E402

LOSSES = {
    "supcon": FC.supcon_loss,
    "schane": FC.schane_loss,
    "focal": FC.focal_supcon_loss,
}
CSV_COLUMNS = ("loss", "provider", "mode", "metric", "unit", "N", "D", "dtype", "median", "p20", "p80",
               "device name", "fastcon version", "timestamp")


_quantile = quantile


def measure(loss_fn, n, d, dtype, backend, reps, warmup):
    """fwd+bwd times (ms) over ``reps`` runs, and the peak extra memory (bytes) of one run."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n // 2, 2, d, generator=g).to(device="cuda", dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, 1000, (n // 2,), generator=g).cuda()

    def step():
        feats.grad = None
        loss_fn(feats, labels, backend=backend).backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    feats.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grad_bytes = feats.grad.numel() * feats.grad.element_size()
    peak_extra = torch.cuda.max_memory_allocated() - base - grad_bytes
    feats.grad = None
    return times, peak_extra


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reference-max-n", type=int, default=8192, help="largest N timed with the reference backend")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_gpu.py needs a CUDA GPU")
    import triton

    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{gpu}  torch {torch.__version__}  triton {triton.__version__}  D={args.dim} {args.dtype}")
    print(f"{'loss':8s} {'backend':10s} {'N':>6s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'peak extra MB':>14s}")
    rows, median_ms, peak_mb = [], {}, {}
    for name, fn in LOSSES.items():
        for n in args.sizes:
            backends = ["triton"] + (["reference"] if n <= args.reference_max_n else [])
            for backend in backends:
                times, peak = measure(fn, n, args.dim, dtype, backend, args.reps, args.warmup)
                med, p20, p80 = statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8)
                median_ms[name, backend, n] = med
                peak_mb[name, backend, n] = peak / 2**20
                print(f"{name:8s} {backend:10s} {n:6d} {med:10.2f} {p20:8.2f} {p80:8.2f} {peak / 2**20:14.1f}")
                common = [name, backend, "forward+backward"]
                shape = [n, args.dim, args.dtype]
                tail = [gpu, fastcon.__version__, stamp]
                rows.append(common + ["time", "ms"] + shape + [f"{med:.6g}", f"{p20:.6g}", f"{p80:.6g}"] + tail)
                rows.append(common + ["peak_memory", "MB"] + shape + [f"{peak / 2**20:.6g}"] * 3 + tail)
    print()
    for name in LOSSES:
        for n in args.sizes:
            if (name, "reference", n) in median_ms:
                speedup = median_ms[name, "reference", n] / median_ms[name, "triton", n]
                print(f"{name} N={n}: triton is {speedup:.1f}x faster than the reference")
    n_big = max(args.sizes)
    if ("supcon", "triton", 65536) in median_ms and args.dim == 128 and args.dtype == "bfloat16":
        ms, mb = median_ms["supcon", "triton", 65536], peak_mb["supcon", "triton", 65536]
        print(f"target SupCon N=65536: {ms:.2f} ms (<= 15: {'met' if ms <= 15 else 'NOT met'}), "
              f"peak extra {mb:.1f} MB (<= 64: {'met' if mb <= 64 else 'NOT met'})")
    if ("supcon", "reference", 8192) in median_ms:
        speedup = median_ms["supcon", "reference", 8192] / median_ms["supcon", "triton", 8192]
        print(f"target SupCon N=8192 speed-up >= 5x: {speedup:.1f}x ({'met' if speedup >= 5 else 'NOT met'})")
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    path = os.path.join(args.out, f"triton_{slug}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    print(f"wrote {path} (largest N {n_big})")


if __name__ == "__main__":
    main()
