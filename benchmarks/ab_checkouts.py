"""Same-run speed and memory of two fastcon checkouts (before / after a change).

Each point runs ``fastcon.functional.<loss>_loss(backend=...)`` forward + backward in a fresh
subprocess whose ``PYTHONPATH`` is one checkout (so its peak RSS is its own), one warm-up then
``--repeats`` timed runs; the two checkouts alternate over ``--rounds`` rounds so background
load falls on both alike. Prints each round, then the median over rounds of each round's best
time, the after/before ratio and the peak resident memory.

    python benchmarks/ab_checkouts.py --before ../fastcon-main --after . --n 16384

A checkout's native kernel is the one its own loader finds; ``--before-lib`` / ``--after-lib``
point ``FASTCON_NATIVE_LIB`` at a given library instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
import fastcon.functional as FC
n, d, loss, backend, repeats, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
x = torch.nn.functional.normalize(torch.randn(int(n) // 2, 2, int(d)), dim=-1).requires_grad_()
y = torch.randint(0, 100, (int(n) // 2,))
fn = getattr(FC, loss + "_loss")
times = []
for i in range(int(repeats) + 1):
    x.grad = None
    t = time.perf_counter()
    fn(x, y, backend=backend).backward()
    times.append(time.perf_counter() - t)
print(json.dumps({"best": min(times[1:]), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_point(checkout, lib, args):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    if lib:
        env["FASTCON_NATIVE_LIB"] = os.path.abspath(lib)
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.n), str(args.d), args.loss, args.backend,
                          str(args.repeats), str(args.threads)], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.abspath(checkout))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--before-lib")
    p.add_argument("--after-lib")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--loss", default="supcon", choices=["supcon", "schane", "focal_supcon"])
    p.add_argument("--backend", default="native")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    results = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for which in order:
            point = run_point(getattr(args, which), getattr(args, which + "_lib"), args)
            results[which].append(point)
            print(f"round {r}: {which:6s} {point['best']:.3f} s  peak RSS {point['rss_mb']:.0f} MB", flush=True)
    med = {k: statistics.median(p["best"] for p in v) for k, v in results.items()}
    rss = {k: max(p["rss_mb"] for p in v) for k, v in results.items()}
    print(f"\n{args.loss} backend={args.backend} float32 fwd+bwd N={args.n} D={args.d}, {args.threads} threads, "
          f"{args.rounds} rounds (median of each round's best of {args.repeats})")
    print(f"before {med['before']:.3f} s  peak RSS {rss['before']:.0f} MB")
    print(f"after  {med['after']:.3f} s  peak RSS {rss['after']:.0f} MB")
    print(f"after / before: time {med['after'] / med['before']:.3f}, peak RSS {rss['after'] / rss['before']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
