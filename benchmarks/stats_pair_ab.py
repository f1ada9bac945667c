"""A/B on a GPU: the statistics kernel's plain loop as shipped, against the loop that takes two
tiles per iteration and carries the second one's product (benchmarks/README.md, "Tensor cores
and the softmax on Hopper").

    python benchmarks/stats_pair_ab.py                   # CUDA: SupCon and focal bf16, N = 16384, 65536
    python benchmarks/stats_pair_ab.py --check            # only build the variant's source tree (no GPU)

The variant is this checkout with the plain loop of ``stats_kernel`` replaced (the text below;
the script stops if the shipped loop has changed), in a temporary copy of ``fastcon/``. Each
round runs one process per variant, in alternating order; a process times the forward without
autograd (the statistics kernel and the row preparation) and forward + backward, with the fixed
configurations (``FASTCON_TRITON_AUTOTUNE=0``) so that only the loop differs. Reports the median
over rounds of each round's median, and the variant / shipped ratio; writes
``stats_pair_ab_<gpu>.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join("fastcon", "backends", "triton", "kernels.py")

SHIPPED_LOOP = '''        for t in range(0, n_plain):  # every column is in A(i), and (SCHaNe) in N(i)
            tile = s0 + t + tl.where(s0 + t >= blo, bw, 0)
            cols = tile * BN + tl.arange(0, BN)
            qk, _ = tile_qk(own, other_ptr, cols, cols < n_other, DP, DOT_PRECISION, UPCAST_DOT, False)
            r0, r1, r2, r3 = tm.dense_update(qk, qk, qk, c1, beta, r0, r1, r2, r3, LOSS, False,
                                             BETA_ZERO, BETA_ONE, BETA_NEG)
'''

PAIR_LOOP = '''        # two tiles per iteration; the second one's product is carried, in flight during the math
        cols = (s0 + tl.where(s0 >= blo, bw, 0)) * BN + tl.arange(0, BN)
        qa, _ = tile_qk(own, other_ptr, cols, (cols < n_other) & (n_plain > 0), DP, DOT_PRECISION, UPCAST_DOT,
                        True)
        for t in tl.range(0, n_plain // 2, num_stages=2):
            u = 2 * t + 1
            cols = (s0 + u + tl.where(s0 + u >= blo, bw, 0)) * BN + tl.arange(0, BN)
            qb, _ = tile_qk(own, other_ptr, cols, cols < n_other, DP, DOT_PRECISION, UPCAST_DOT, False)
            r0, r1, r2, r3 = tm.dense_update(qa, qa, qa, c1, beta, r0, r1, r2, r3, LOSS, False,
                                             BETA_ZERO, BETA_ONE, BETA_NEG)
            u = tl.minimum(2 * t + 2, n_plain - 1)
            cols = (s0 + u + tl.where(s0 + u >= blo, bw, 0)) * BN + tl.arange(0, BN)
            qa, _ = tile_qk(own, other_ptr, cols, cols < n_other, DP, DOT_PRECISION, UPCAST_DOT, False)
            r0, r1, r2, r3 = tm.dense_update(qb, qb, qb, c1, beta, r0, r1, r2, r3, LOSS, False,
                                             BETA_ZERO, BETA_ONE, BETA_NEG)
        if n_plain % 2 == 1:
            r0, r1, r2, r3 = tm.dense_update(qa, qa, qa, c1, beta, r0, r1, r2, r3, LOSS, False,
                                             BETA_ZERO, BETA_ONE, BETA_NEG)
'''

CHILD = r"""
import json, statistics, sys, torch
import fastcon.functional as FC
sizes, losses, reps = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
out = {}
for loss in losses:
    fn = {"supcon": FC.supcon_loss, "focal": FC.focal_supcon_loss, "schane": FC.schane_loss}[loss]
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n // 2, 2, 128, generator=g).to(device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        y = torch.randint(0, 100, (n // 2,), generator=g).cuda()
        def forward():
            with torch.no_grad():
                fn(x, y, backend="triton")
        def train():
            x.grad = None
            fn(x, y, backend="triton").backward()
        for name, step in (("forward", forward), ("forward+backward", train)):
            step(); step()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); step(); b.record(); b.synchronize()
                times.append(a.elapsed_time(b))
            out[f"{loss}|{n}|{name}"] = statistics.median(times)
print("RESULT " + json.dumps(out))
"""


def variant_tree(folder):
    """A copy of ``fastcon/`` with the paired loop; raises if the shipped loop is not found."""
    src = open(os.path.join(ROOT, KERNELS)).read()
    if src.count(SHIPPED_LOOP) != 1:
        raise SystemExit(f"the plain loop of stats_kernel in {KERNELS} is not the one this A/B replaces")
    shutil.copytree(os.path.join(ROOT, "fastcon"), os.path.join(folder, "fastcon"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(folder, KERNELS), "w") as f:
        f.write(src.replace(SHIPPED_LOOP, PAIR_LOOP))
    return folder


def run_child(path, sizes, losses, reps):
    env = dict(os.environ, PYTHONPATH=path, FASTCON_TRITON_AUTOTUNE="0")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sizes), json.dumps(losses), str(reps)],
                          env=env, capture_output=True, text=True, cwd=path)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT "):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--losses", nargs="+", choices=["supcon", "schane", "focal"], default=["supcon", "focal"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--check", action="store_true", help="build the variant's tree and stop (no GPU needed)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="fastcon-pair-")
    try:
        trees = {"shipped": ROOT, "pair": variant_tree(folder)}
        if args.check:
            print(f"variant tree built in {folder}")
            return 0
        import torch

        gpu = torch.cuda.get_device_name()
        results = {name: [] for name in trees}
        for r in range(args.rounds):
            for name in (list(trees) if r % 2 == 0 else list(reversed(trees))):
                results[name].append(run_child(trees[name], args.sizes, args.losses, args.reps))
                print(f"round {r} {name}: " + " ".join(f"{k}={v:.3f}" for k, v in results[name][-1].items()),
                      flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    md = [f"# Statistics kernel plain loop, shipped vs two tiles per iteration: {gpu}, torch {torch.__version__}",
          "", f"bf16, D = 128, fixed configurations, median ms over {args.rounds} rounds of {args.reps} calls.", "",
          "| loss | N | mode | shipped ms | pair ms | pair / shipped |", "|---|---|---|---|---|---|"]
    for key in results["shipped"][0]:
        loss, n, mode = key.split("|")
        a = statistics.median(x[key] for x in results["shipped"])
        b = statistics.median(x[key] for x in results["pair"])
        rows.append({"loss": loss, "N": n, "mode": mode, "shipped_ms": f"{a:.4f}", "pair_ms": f"{b:.4f}",
                     "ratio": f"{b / a:.3f}", "device name": gpu})
        md.append(f"| {loss} | {n} | {mode} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    from interleaved_sweep import slug

    name = slug(gpu)
    with open(os.path.join(args.out, f"stats_pair_ab_{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, f"stats_pair_ab_{name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
