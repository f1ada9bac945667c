"""fastcon's native CPU backend against the dense SupCon algorithm at small and medium N:
aten operators per forward+backward and time per call, measured interleaved in one run
(see :mod:`fastcon.bench.small_n`). Run it on a quiet machine:

    python benchmarks/native_small_n.py                       # N = 64 ... 8192, D = 128
    python benchmarks/native_small_n.py --sizes 64 256 --out /tmp/x

Writes ``native_small_n.csv`` and ``native_small_n.md`` (with the machine named) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from fastcon.bench.measure import write_rows
from fastcon.bench.small_n import run


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--samples", type=int, default=41)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    import fastcon.native

    if not fastcon.native.is_available():
        print(f"the native kernel is not available: {fastcon.native.import_error()}", file=sys.stderr)
        return 1
    rows = run(args.sizes, args.d, samples=args.samples)
    os.makedirs(args.out, exist_ok=True)
    write_rows(os.path.join(args.out, "native_small_n.csv"), rows)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    lines = [f"# fastcon native vs the dense SupCon algorithm, float32, D = {args.d}", "",
             f"Machine: {machine}. Command: `python benchmarks/native_small_n.py {' '.join(argv or sys.argv[1:])}`"
             .rstrip() + ".", "",
             "One SupCon \"mean\" forward+backward of [N/2, 2, D] features, 10 classes; contenders interleaved, "
             f"median of {args.samples} samples.", "",
             "| N | aten ops, native | aten ops, dense | native µs | dense µs | native / dense |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['ops_native']} | {r['ops_dense']} | {r['us_native']} | {r['us_dense']} | "
                     f"{r['native_over_dense']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "native_small_n.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
