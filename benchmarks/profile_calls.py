"""What one forward + backward call of a fastcon loss launches, and whether it synchronises.

    python benchmarks/profile_calls.py                        # CUDA: SupCon bf16, N = 1024 and 8192, D = 128
    python benchmarks/profile_calls.py --device cpu --sizes 64

For each N, after three untimed calls (compiling and autotuning):

- ``wall_ms_per_call``: ``--calls`` calls back to back, synchronised at both ends, without
  the profiler;
- under ``torch.profiler`` (the same number of calls): ``kernels_per_call`` (CUDA kernels;
  on CPU, the operators the profiler records), ``memops_per_call`` (memset and memcpy), and
  ``gpu_busy_ms_per_call``: the union of the kernels' and memory operations' intervals, so
  ``busy_fraction`` = busy / wall says how much of the call the GPU spends waiting for the
  host;
- ``sync_warnings``: one call under ``torch.cuda.set_sync_debug_mode("warn")``: the number of
  synchronising CUDA operations it made (host syncs, e.g. ``.item()`` or a ``nonzero``); when
  there are some, one more call under ``"error"`` names where the first one happens;
- per kernel: launches and GPU time per call (the statistics and gradient kernels apart).

Output (``--out``): ``profile_<device>.csv`` (the columns of the sweep's CSV) and
``profile_<device>.md`` (the table, the most launched kernels, the synchronisation check).
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastcon  # noqa: E402
from interleaved_sweep import COLUMNS, LOSSES, NUM_CLASSES, device_name, slug  # noqa: E402

MEMORY_OPS = ("Memset", "Memcpy")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _union_us(intervals):
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_point(step, device, calls):
    """``(figures, {kernel: (launches, total us)})`` of ``calls`` calls of ``step`` (warmed up)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        _sync(device)
    kernels, memops, intervals = collections.Counter(), 0, []
    kernel_us = collections.Counter()
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            intervals.append((e.time_range.start, e.time_range.end))
            if e.name.startswith(MEMORY_OPS):
                memops += 1
            else:
                kernels[e.name] += 1
                kernel_us[e.name] += e.time_range.end - e.time_range.start
        elif e.cpu_parent is None and e.device_type == torch.autograd.DeviceType.CPU:
            # CPU: top-level operators; their own intervals stand for the device's work
            intervals.append((e.time_range.start, e.time_range.end))
            kernels[e.name] += 1
            kernel_us[e.name] += e.time_range.end - e.time_range.start
    busy_ms = _union_us(intervals) / 1e3 / calls
    figures = {"kernels_per_call": sum(kernels.values()) / calls, "memops_per_call": memops / calls,
               "gpu_busy_ms_per_call": busy_ms, "wall_ms_per_call": wall_ms,
               "busy_fraction": busy_ms / wall_ms if wall_ms > 0 else float("nan")}
    return figures, {name: (count, kernel_us[name]) for name, count in kernels.items()}


def sync_check(step, device):
    """``(count, notes)``: synchronising operations of one call, and where the first one is."""
    if device.type != "cuda":
        return None, "not checked: CUDA's synchronisation debug mode needs a CUDA device"
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    if not found:
        return 0, "no synchronising operation"
    torch.cuda.set_sync_debug_mode("error")
    where = ""
    try:
        step()
    except RuntimeError:
        frames = [f for f in traceback.extract_tb(sys.exc_info()[2]) if "fastcon" in f.filename]
        where = "; first raised at " + " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                                                   for f in reversed(frames[-4:]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return len(found), f"{len(found)} warning(s): {sorted(set(found))}{where}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--loss", choices=list(LOSSES), default="supcon")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--backend", default=None, help="fastcon backend (default: triton on CUDA, native on CPU)")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    backend = args.backend or ("triton" if device.type == "cuda" else "native")
    name = device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows, md = [], [f"# Calls of {args.loss} ({args.dtype}, D = {args.dim}, backend {backend}): {name}, "
                    f"torch {torch.__version__}", "",
                    "| N | kernels / call | memset+memcpy / call | GPU busy ms / call | wall ms / call | busy / wall "
                    "| sync warnings |", "|---|---|---|---|---|---|---|"]
    details = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n // 2, 2, args.dim, generator=g).to(device=device, dtype=getattr(torch, args.dtype))
        x.requires_grad_(True)
        labels = torch.randint(0, NUM_CLASSES, (n // 2,), generator=g).to(device)

        def step():
            x.grad = None
            LOSSES[args.loss](x, labels, backend=backend).backward()

        for _ in range(3):
            step()
        figures, kernels = profile_point(step, device, args.calls)
        count, note = sync_check(step, device)
        figures["sync_warnings"] = float("nan") if count is None else count
        units = {"gpu_busy_ms_per_call": "ms", "wall_ms_per_call": "ms"}
        for metric, value in figures.items():
            rows.append({"loss": args.loss, "provider": f"fastcon-{backend}", "mode": "forward+backward",
                         "metric": metric, "unit": units.get(metric, "count"), "N": n, "D": args.dim,
                         "dtype": args.dtype, "median": f"{value:.6g}", "p20": "", "p80": "", "device name": name,
                         "fastcon version": fastcon.__version__, "timestamp": stamp, "reps": args.calls,
                         "note": note if metric == "sync_warnings" else ""})
        f = figures
        md.append(f"| {n} | {f['kernels_per_call']:.1f} | {f['memops_per_call']:.1f} | "
                  f"{f['gpu_busy_ms_per_call']:.3f} | {f['wall_ms_per_call']:.3f} | {f['busy_fraction']:.2f} | "
                  f"{'-' if count is None else count} |")
        details.append(f"\nN = {n}: {note}. Launched per call (and their time per call):\n")
        by_time = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]
        details += [f"- {c / args.calls:g} x `{k[:100]}`: {us / args.calls / 1e3:.4f} ms" for k, (c, us) in by_time]
        print(md[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile_{slug(name)}.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, f"profile_{slug(name)}.md"), "w") as fh:
        fh.write("\n".join(md + details) + "\n")
    print("\n".join(details))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
