"""Forward + backward time of every contender at once, interleaved, in one process.

    python benchmarks/interleaved_sweep.py                       # CUDA: the GPU check's sweep
    python benchmarks/interleaved_sweep.py --device cpu --sizes 64 128 --reps 1

For each loss, dtype and N (D = 128, ``[N/2, 2, D]`` features of 100 random classes) the
contenders are set up side by side and then timed in turns: repetition r times contender
A, then B, then C, ..., so that clock and thermal drift fall on every contender alike.
Contenders:

- ``fastcon-<backend>``: the loss and ``backward()`` eagerly, on each fast backend of the
  device (``triton`` on CUDA; ``native`` and ``blockwise`` on CPU);
- ``fastcon-<backend>+cudagraph``: the same step captured once in a CUDA graph
  (``torch.cuda.graph`` on static inputs) and replayed (CUDA only; elsewhere a ``skipped`` row);
- ``reference``: the dense reference (``backend="reference"``);
- ``reference+compile``: the dense reference under ``torch.compile(dynamic=True)``.

One repetition times ``inner`` calls back to back (enough for a few milliseconds, from the
untimed first calls) and divides: what a training loop sees, launch overhead included.
The first call of each contender (compilation, autotuning, capture) is reported apart as
``first_call`` seconds. A contender that runs out of memory is recorded (``oom``) and not
tried at larger N; one that fails is recorded (``failed``, with the error). The sweep keeps
to ``--budget-s``: each point gets the time left divided by the points left, repetitions
are cut to fit it, and points beyond the budget are recorded as ``skipped``. The CSV is
rewritten after every point, so a run stopped from outside keeps what it measured.

Output (``--out``): ``speed_<device>.csv`` (the columns of ``fastcon bench`` plus ``reps``
and ``note``) and ``speed_<device>.md`` (median ms per contender, and the ratios).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import fastcon  # noqa: E402
import fastcon.functional as FC  # noqa: E402
from fastcon.bench.measure import quantile  # noqa: E402
from fastcon.bench.point import _is_out_of_memory  # noqa: E402

LOSSES = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}
SIZES = (256, 1024, 4096, 8192, 16384, 65536)
DTYPES = ("bfloat16", "float32")
CONTENDERS = ("eager", "cudagraph", "reference", "compile")
COLUMNS = ("loss", "provider", "mode", "metric", "unit", "N", "D", "dtype", "median", "p20", "p80",
           "device name", "fastcon version", "timestamp", "reps", "note")
NUM_CLASSES = 100
FAST = {"cuda": ("triton",), "cpu": ("native", "blockwise")}  # blockwise on CUDA is a fallback, not timed
TARGET_REP_S = {"cuda": 0.005, "cpu": 0.02}  # one repetition runs for about this long


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def fast_backends(device: torch.device):
    """fastcon's fast backends timed on ``device`` (those of :data:`FAST` that can run here)."""
    from fastcon import backends

    return [name for name in FAST.get(device.type, ()) if backends.REGISTRY[name].available]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """One way to run a training step's loss: ``setup()`` (untimed, may raise), then ``step()``."""

    def __init__(self, provider, fn, feats, labels, backend, device, kind):
        self.provider, self.kind, self.device = provider, kind, device
        self.note, self.failed, self.first_call_s, self.inner = "", None, float("nan"), 1
        self.times = []
        self._fn, self._labels, self._backend = fn, labels, backend
        self._x = feats.detach().clone().requires_grad_(True)
        self._graph = None
        self._call = None

    def _eager(self):
        self._x.grad = None
        self._call(self._x, self._labels).backward()

    def setup(self):
        fn, backend = self._fn, self._backend
        start = time.perf_counter()
        if self.kind == "compile":
            self._call = torch.compile(lambda x, y: fn(x, y, backend="reference"), dynamic=True)
        else:
            self._call = lambda x, y: fn(x, y, backend=backend)
        if self.kind == "cudagraph":
            self._capture()
        else:
            self._eager()
            self._eager()  # a second shape-identical call: torch.compile may recompile once
        _sync(self.device)
        self.first_call_s = time.perf_counter() - start
        per_call = self._time_calls(1)
        self.inner = max(1, min(100, math.ceil(TARGET_REP_S[self.device.type] / max(per_call, 1e-6))))

    def _capture(self):
        """Warm up on a side stream (compiles and autotunes), then capture forward + backward:
        the gradient is allocated in the graph's pool, so ``self._x.grad`` is static too."""
        if self.device.type != "cuda":
            raise NotImplementedError("CUDA graphs need a CUDA device")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._call(self._x, self._labels).backward()
        self._graph = graph

    def step(self):
        if self._graph is not None:
            self._graph.replay()
        else:
            self._eager()

    def _time_calls(self, inner):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                self.step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        start = time.perf_counter()
        for _ in range(inner):
            self.step()
        return (time.perf_counter() - start) / inner

    def rep(self):
        self.times.append(self._time_calls(self.inner) * 1e3)

    def close(self):
        self._graph = self._call = self._x = None


def build_contenders(kinds, fn, feats, labels, device, skip):
    """The contenders of one point; ``skip`` maps a provider to why it is not run (not tried)."""
    fast = fast_backends(device)
    specs = []
    for kind in kinds:
        if kind == "eager":
            specs += [(f"fastcon-{b}", b, kind) for b in fast]
        elif kind == "cudagraph":
            specs += [(f"fastcon-{fast[0]}+cudagraph", fast[0], kind)] if fast else []
        elif kind == "reference":
            specs.append(("reference", "reference", kind))
        elif kind == "compile":
            specs.append(("reference+compile", "reference", kind))
        else:
            raise ValueError(f"contenders must be among {CONTENDERS}, got {kind!r}")
    out = []
    for provider, backend, kind in specs:
        c = Contender(provider, fn, feats, labels, backend, device, kind)
        if provider in skip:
            c.failed = ("skipped", skip[provider])
        elif kind == "cudagraph" and device.type != "cuda":
            c.failed = ("skipped", "CUDA graphs need a CUDA device")
        out.append(c)
    return out


def _error_text(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _attempt(c, action, device):
    """Run ``c``'s ``action``; a failure is recorded on ``c`` (out of memory as ``oom``)."""
    try:
        action()
        return True
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        c.failed = ("oom", "out of memory") if _is_out_of_memory(e) else ("failed", _error_text(e))
        c.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False


def measure_point(contenders, reps, budget_s, device):
    """Set every contender up, then time them in turns: at most ``reps`` repetitions, fewer
    when they would not fit in ``budget_s`` (at least one each)."""
    start = time.perf_counter()
    live = [c for c in contenders if not c.failed and _attempt(c, c.setup, device)]
    left = budget_s - (time.perf_counter() - start)
    if not live:
        return contenders
    probe = time.perf_counter()
    live = [c for c in live if _attempt(c, c.rep, device)]
    per_rep = time.perf_counter() - probe
    n = 1 + max(0, min(reps - 1, int(left / max(per_rep, 1e-6)) - 1))
    for r in range(1, n):
        order = live[r % len(live):] + live[:r % len(live)] if live else []  # who goes first rotates too
        live = [c for c in order if _attempt(c, c.rep, device)]
    return contenders


def rows_of(contenders, loss, n, d, dtype, common):
    rows = []
    for c in contenders:
        base = dict(loss=loss, provider=c.provider, mode="forward+backward", N=n, D=d, dtype=dtype, **common)
        if c.failed:
            metric, why = c.failed
            rows.append(dict(base, metric=metric, unit="", median="nan", p20="nan", p80="nan", reps=0, note=why))
            continue
        t = c.times
        rows.append(dict(base, metric="time", unit="ms", median=f"{statistics.median(t):.6g}",
                         p20=f"{quantile(t, 0.2):.6g}", p80=f"{quantile(t, 0.8):.6g}", reps=len(t),
                         note=f"{c.inner} calls per repetition"))
        rows.append(dict(base, metric="first_call", unit="s", median=f"{c.first_call_s:.4g}", p20="", p80="",
                         reps=1, note="the first two calls (compiling and autotuning)" if c.kind != "cudagraph"
                         else "three warm-up calls (compiling and autotuning) and the capture"))
    return rows


def markdown(rows, title):
    """Median ms per point and contender, then each contender's ratio to the first fastcon one."""
    times = {}
    providers = []
    for r in rows:
        if r["provider"] not in providers:
            providers.append(r["provider"])
        key = (r["loss"], r["dtype"], int(r["N"]))
        if r["metric"] == "time":
            times.setdefault(key, {})[r["provider"]] = f"{float(r['median']):.3f}"
        elif r["metric"] != "first_call":
            times.setdefault(key, {})[r["provider"]] = r["metric"]
    lines = [f"# {title}", "", "Median forward + backward ms per call (`oom`, `failed`, `skipped`: see the CSV's "
             "note).", "", "| loss | dtype | N | " + " | ".join(providers) + " |",
             "|---|---|---|" + "---|" * len(providers)]
    for (loss, dtype, n), by in times.items():
        lines.append(f"| {loss} | {dtype} | {n} | " + " | ".join(by.get(p, "") for p in providers) + " |")
    return "\n".join(lines) + "\n"


def write(rows, out, name, title):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"speed_{name}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, f"speed_{name}.md"), "w") as f:
        f.write(markdown(rows, title))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16", "float32"], default=list(DTYPES))
    p.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--reps", type=int, default=15, help="repetitions per contender at most")
    p.add_argument("--budget-s", type=float, default=200.0, help="the whole sweep's time budget")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    name = slug(device_name(device))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {"device name": device_name(device), "fastcon version": fastcon.__version__, "timestamp": stamp}
    title = f"Interleaved forward + backward sweep: {device_name(device)}, torch {torch.__version__}, D = {args.dim}"
    print(title, flush=True)
    points = [(dtype, loss, n) for dtype in args.dtypes for loss in args.losses for n in sorted(args.sizes)]
    deadline = time.perf_counter() + args.budget_s
    rows, too_big = [], {}
    for i, (dtype, loss, n) in enumerate(points):
        left = deadline - time.perf_counter()
        g = torch.Generator().manual_seed(i)
        feats = torch.randn(n // 2, 2, args.dim, generator=g).to(device=device, dtype=getattr(torch, dtype))
        labels = torch.randint(0, NUM_CLASSES, (n // 2,), generator=g).to(device)
        skip = {p: why for (l, t, p), why in too_big.items() if (l, t) == (loss, dtype)}
        contenders = build_contenders(args.contenders, LOSSES[loss], feats, labels, device, skip)
        if left <= 0:
            for c in contenders:
                c.failed = c.failed or ("skipped", f"time budget of {args.budget_s:.0f} s spent")
        else:
            measure_point(contenders, args.reps, left / (len(points) - i), device)
        for c in contenders:
            if c.failed and c.failed[0] == "oom":
                too_big[(loss, dtype, c.provider)] = f"out of memory at N = {n}"
            c.close()
        new = rows_of(contenders, loss, n, args.dim, dtype, common)
        rows += new
        for r in new:
            if r["metric"] != "first_call":
                print(f"{loss:7s} {dtype:9s} N={n:6d} {r['provider']:28s} {r['metric']:8s} {r['median']:>10s} "
                      f"{r['note']}", flush=True)
        del feats, labels, contenders
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(rows, args.out, name, title)
    print(f"wrote {os.path.join(args.out, f'speed_{name}.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
