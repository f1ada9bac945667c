"""Native CPU kernel against the three-matmul floor and the published dense SupCon algorithm.

The native kernel's targets, float32 forward+backward at N = 16384 rows, D = 128, on the machine's
CPU threads: native SupCon at most 1.5x the three-matmul floor measured in the same run, at
least 3x faster than the dense published algorithm, peak resident memory under 1 GB.

Every point runs in a fresh subprocess (so its peak RSS, ``ru_maxrss``, is its own), with one
untimed warm-up and ``--repeats`` timed runs (the dense algorithm: ``--dense-repeats``). The
points are interleaved over ``--rounds`` rounds and each round's ratios use that round's
floor, so background load shifts numerator and denominator alike.

    python benchmarks/bench_native_cpu.py                       # the targets' point
    python benchmarks/bench_native_cpu.py --n 4096 --rounds 1   # a quick look

Points:
  floor         the three products of a forward+backward: s = z z^T, s z, s^T z (dense, timed alone;
                s is materialised, 1 GiB at N = 16384, as the dense algorithm holds it)
  floor_blocked the same three products per block of 1024 rows (no N x N matrix), for context
  native_supcon / native_schane   fastcon.functional loss(backend="native"), forward + backward
  dense_supcon  the published SupCon algorithm (HobbitLong/SupContrast losses.py), re-implemented below
  blockwise_supcon (with --blockwise)   fastcon's blockwise PyTorch path, for context
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcon.bench.measure import peak_rss_mib, write_rows

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NUM_CLASSES = 100
TEMPERATURE = 0.07


def dense_supcon(features: torch.Tensor, labels: torch.Tensor, temperature=TEMPERATURE,
                 base_temperature=TEMPERATURE) -> torch.Tensor:
    """The published dense SupCon algorithm (contrast_mode "all"): the full N x N logits, a
    row-max shift, N x N label and self masks, and log-probabilities over every column."""
    batch, views, _ = features.shape
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)  # view-major [V*B, D]
    logits = torch.div(contrast @ contrast.T, temperature)
    row_max, _ = torch.max(logits, dim=1, keepdim=True)
    logits = logits - row_max.detach()
    same_label = torch.eq(labels[:, None], labels[None, :]).float().repeat(views, views)
    rows = torch.arange(batch * views)[:, None]
    not_self = torch.scatter(torch.ones_like(same_label), 1, rows, 0)
    positives = same_label * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (positives * log_prob).sum(1) / positives.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(views, batch).mean()


def _inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n // 2, 2, d, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n // 2,), generator=g)
    return features, labels


def _step(point):
    """One forward+backward of ``point`` as a closure over fresh inputs."""
    import fastcon.functional as FC

    if point in ("floor", "floor_blocked"):  # the whole s = z z^T at once, or 1024 rows at a time
        rows = 1024 if point == "floor_blocked" else None

        def run(z, _labels):
            step = rows or z.shape[0]
            for r0 in range(0, z.shape[0], step):
                block = z[r0:r0 + step]
                s = block @ z.T
                s @ z
                s.T @ block
        return run
    if point == "dense_supcon":
        def run(x, labels):
            x = x.clone().requires_grad_(True)
            dense_supcon(F.normalize(x, dim=2), labels).backward()
        return run
    backend, kind = point.split("_")
    fn = {"supcon": FC.supcon_loss, "schane": FC.schane_loss}[kind]

    def run(x, labels):
        x = x.clone().requires_grad_(True)
        fn(x, labels, temperature=TEMPERATURE, backend=backend).backward()
    return run


_maxrss_mb = peak_rss_mib


def measure_point(point, n, d, repeats):
    """Runs in the subprocess: times of ``repeats`` runs after one warm-up, and peak RSS."""
    if point.startswith("native"):
        from fastcon import native
        if not native.is_available():
            raise SystemExit(f"native kernel not built: {native.import_error()}")
    features, labels = _inputs(n, d)
    args = (features.reshape(n, d),) if point.startswith("floor") else (features,)
    base_rss = _maxrss_mb()
    run = _step(point)
    run(*args, labels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(*args, labels)
        times.append(time.perf_counter() - t0)
    return dict(point=point, times=times, peak_rss_mb=_maxrss_mb(), base_rss_mb=base_rss)


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _spawn(point, n, d, repeats):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--point", point, "--n", str(n), "--d", str(d),
                          "--repeats", str(repeats)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dense-repeats", type=int, default=1)
    p.add_argument("--blockwise", action="store_true", help="also time the blockwise PyTorch path")
    p.add_argument("--no-dense", action="store_true", help="skip the dense algorithm (N^2 memory)")
    p.add_argument("--out", type=Path, default=RESULTS / "native_cpu.csv")
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(args.point, args.n, args.d, args.repeats)))
        return

    points = ["floor", "floor_blocked", "native_supcon", "native_schane"]
    if args.blockwise:
        points.append("blockwise_supcon")
    if not args.no_dense:
        points.append("dense_supcon")
    meta = dict(n=args.n, d=args.d, dtype="float32", threads=torch.get_num_threads(), cpu=_cpu_name(),
                torch=torch.__version__)
    rows = []
    for rnd in range(args.rounds):
        results = {}
        for point in points:
            reps = args.dense_repeats if point == "dense_supcon" else args.repeats
            results[point] = _spawn(point, args.n, args.d, reps)
            print(f"round {rnd}: {point:17s} {min(results[point]['times']):8.3f} s  "
                  f"peak RSS {results[point]['peak_rss_mb']:7.0f} MB", flush=True)
        floor = min(results["floor"]["times"])
        floor_blocked = min(results["floor_blocked"]["times"])
        dense = min(results["dense_supcon"]["times"]) if "dense_supcon" in results else float("nan")
        for point, r in results.items():
            t = min(r["times"])
            rows.append(dict(meta, round=rnd, point=point, time_s=round(t, 4),
                             times_s=" ".join(f"{x:.4f}" for x in r["times"]),
                             ratio_to_floor=round(t / floor, 3),
                             ratio_to_blocked_floor=round(t / floor_blocked, 3), speedup_vs_dense=round(dense / t, 3),
                             peak_rss_mb=round(r["peak_rss_mb"], 1), base_rss_mb=round(r["base_rss_mb"], 1)))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(args.out, rows)

    print(f"\n{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, float32 fwd+bwd, "
          f"N={args.n}, D={args.d}, {args.rounds} rounds (median over rounds of each round's best)")
    print(f"{'point':18s} {'time s':>8s} {'x floor':>8s} {'x blocked':>10s} {'vs dense':>9s} {'peak RSS MB':>12s}")
    for point in points:
        mine = [r for r in rows if r["point"] == point]
        med = lambda key: statistics.median(r[key] for r in mine)  # noqa: E731
        print(f"{point:18s} {med('time_s'):8.3f} {med('ratio_to_floor'):8.3f} "
              f"{med('ratio_to_blocked_floor'):10.3f} {med('speedup_vs_dense'):9.2f} "
              f"{max(r['peak_rss_mb'] for r in mine):12.0f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
