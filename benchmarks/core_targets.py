"""The core targets on CPU: peak resident memory of SupCon fwd+bwd at N = 16384, D = 128
(default backend), and the time of the default backend vs the dense reference at N = 4096.

Each memory point runs in a fresh process (CPU allocations are not tracked by torch),
and the baseline RSS of a process that only imported torch and made the inputs is
printed beside it. Timings alternate the two backends so that machine noise hits both.

    python benchmarks/core_targets.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from fastcon.bench.measure import peak_rss_mib


def _child(n, d, backend, run):
    import torch

    import fastcon.functional as FC

    torch.manual_seed(0)
    x = torch.randn(n, d)
    y = torch.randint(0, 100, (n,))
    if run:
        x.requires_grad_(True)
        loss = FC.supcon_loss(x, y, backend=backend)
        loss.backward()
    rss_mb = peak_rss_mib()
    print(json.dumps({"peak_rss_mb": rss_mb}))


def peak_rss(n, d, backend, run=True):
    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(d), backend, str(int(run))],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def time_pair(n, d, repeats):
    import torch

    import fastcon.functional as FC

    torch.manual_seed(0)
    x0 = torch.randn(n, d)
    y = torch.randint(0, 100, (n,))
    times = {"auto": [], "reference": []}
    for _ in range(repeats + 1):  # the first round warms up
        for backend in times:
            x = x0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            FC.supcon_loss(x, y, backend=backend).backward()
            times[backend].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.child:
        n, d, backend, run = args.child
        _child(int(n), int(d), backend, bool(int(run)))
        return
    import torch

    from fastcon._function import resolve_backend

    print(f"default backend on CPU: {resolve_backend('auto', torch.device('cpu'))}, threads {torch.get_num_threads()}")
    base = peak_rss(16384, 128, "auto", run=False)
    auto = peak_rss(16384, 128, "auto")
    print(f"N=16384 D=128 fp32 SupCon fwd+bwd: peak RSS {auto:.0f} MB (process baseline {base:.0f} MB)")
    t = time_pair(4096, 128, args.repeats)
    print(f"N=4096 D=128 fp32 SupCon fwd+bwd median: default {t['auto']*1e3:.0f} ms, "
          f"reference {t['reference']*1e3:.0f} ms, ratio reference/default {t['reference']/t['auto']:.2f}x")


if __name__ == "__main__":
    main()
