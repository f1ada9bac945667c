"""Time and peak memory of gather=True against gather="ring" on W gloo processes (CPU).

    python benchmarks/ring_vs_gather.py --world 2 3 --rows 2048 --dim 128 --repeats 3

Each (world, mode) runs in its own spawn, so a process's peak resident memory belongs to
one mode; the figure reported is the peak growth over the memory held before the first
loss call, the largest over ranks. Prints one CSV line per (world, mode).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastcon.functional as FC
from fastcon.bench.measure import current_rss_mib, peak_rss_mib


_rss_mib = current_rss_mib  # the resident set now, to subtract from the peak


def _worker(rank, world, port, gather, rows, dim, kind, repeats, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows // 2, 2, dim, generator=g, requires_grad=True)
    y = torch.randint(0, 100, (rows // 2,), generator=g)
    fn = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}[kind]
    base = _rss_mib()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn(x, y, gather=gather).backward()
        times.append(time.perf_counter() - t0)
        x.grad = None
    peak = peak_rss_mib()
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(f"{min(times)} {peak - base}\n")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--rows", type=int, default=2048, help="flattened rows per rank (2 views)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--loss", default="supcon", choices=["supcon", "schane", "focal"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("world,mode,loss,rows_per_rank,dim,seconds_fwd_bwd,peak_rss_growth_mib")
    for world in args.world:
        for gather in (True, "ring"):
            out_dir = tempfile.mkdtemp()
            mp.spawn(_worker, args=(world, _free_port(), gather, args.rows, args.dim, args.loss, args.repeats,
                                    out_dir), nprocs=world, join=True)
            results = []
            for r in range(world):
                with open(os.path.join(out_dir, f"{r}.txt")) as f:
                    results.append(f.read().split())
            seconds = max(float(r[0]) for r in results)
            peak = max(float(r[1]) for r in results)
            mode = "ring" if gather == "ring" else "gather"
            print(f"{world},{mode},{args.loss},{args.rows},{args.dim},{seconds:.3f},{peak:.1f}", flush=True)


if __name__ == "__main__":
    main()
