"""``fastcon bench``: speed and memory of fastcon against the published implementations.

- :mod:`.providers`: who computes the loss (fastcon's backends, its dense reference,
  SupContrast's algorithm in :mod:`.supcontrast`, pytorch-metric-learning).
- :mod:`.point`: one measurement, in a fresh process.
- :mod:`.sweep`: the sweep over N, D, dtype, with memory budget and the CSV.
- :mod:`.plots` and :mod:`.table`: the PNG plots and the README tables, from the CSV.

Only argparse is imported here; torch, matplotlib and pytorch-metric-learning are
imported when a command runs.
"""

from __future__ import annotations

import os


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="benchmark speed and memory against the published implementations",
        description="Sweep N = 256, 512, ... per loss, provider, D and dtype until the provider runs out "
                    "of its memory budget; write results.csv, PNG plots and table.md into --out.",
    )
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:k] (default: cpu)")
    bench.add_argument("--quick", action="store_true",
                       help="N in {256, 512, 1024}, D=128, few repeats: a few minutes on a 2-core CPU")
    bench.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results)")
    bench.add_argument("--budget-gb", type=float, default=None,
                       help="memory budget per point in GiB (default: 20 on CPU, 90%% of the GPU's memory)")
    bench.add_argument("--losses", nargs="+", choices=("supcon", "schane", "focal", "clce"), default=None)
    bench.add_argument("--providers", nargs="+", default=None,
                       help="only these providers (e.g. fastcon-blockwise supcontrast)")
    bench.add_argument("--sizes", nargs="+", type=int, default=None, help="the N values, in increasing order")
    bench.add_argument("--dims", nargs="+", type=int, default=None, help="the D values (for every loss)")
    bench.add_argument("--min-reps", type=int, default=None, help="timed runs per mode at least")
    bench.add_argument("--dry-run", action="store_true", help="print the plan and its expected duration only")
    bench.set_defaults(func=run_bench)

    table = subparsers.add_parser("bench-table", help="print the README tables of a benchmark CSV",
                                  description="Markdown tables (largest N per provider; speed ratios at "
                                              "fixed N) computed from a CSV written by `fastcon bench`.")
    table.add_argument("csv", help="results.csv written by `fastcon bench`")
    table.add_argument("--sizes", nargs="+", type=int, default=[4096, 16384], help="N of the speed tables")
    table.add_argument("--dim", type=int, default=128, help="D of the speed tables")
    table.set_defaults(func=run_table)


def config_from_args(args):
    from dataclasses import replace

    from .sweep import default_config

    config = default_config(args.device, args.quick)
    changes = {}
    if args.budget_gb is not None:
        changes["budget_mib"] = args.budget_gb * 1024.0
    if args.losses:
        changes["losses"] = tuple(args.losses)
    if args.providers:
        changes["providers"] = tuple(args.providers)
    if args.sizes:
        changes["sizes"] = tuple(sorted(args.sizes))
    if args.dims:
        changes["dims"] = tuple(args.dims)
        changes["wide_dim_losses"] = None
    if args.min_reps is not None:
        changes["min_reps"] = args.min_reps
        changes["max_reps"] = max(args.min_reps, config.max_reps)
    return replace(config, **changes)


def run_bench(args) -> int:
    import torch

    from .plots import write_plots
    from .providers import available_providers
    from .sweep import expected_seconds, plan, run_sweep
    from .table import readme_tables

    config = config_from_args(args)
    if args.dry_run:
        providers, skipped = available_providers(torch.device(args.device))
        for name, why in skipped:
            print(f"skipping provider {name}: {why}")
        series = plan(config, providers)
        for loss, provider, d, dtype in series:
            sizes = config.sizes_for(loss, d, provider)
            print(f"{loss:7s} {provider.name:24s} D={d:<4d} {dtype:9s} N={sizes[0]}..{sizes[-1]}")
        print(f"{len(series)} series; expected duration about {expected_seconds(config, series) / 60:.0f} min "
              "on an idle 2-core CPU")
        return 0
    csv_path = run_sweep(config, args.device, args.out)
    plots = write_plots(csv_path, args.out)
    table_path = os.path.join(args.out, "table.md")
    with open(table_path, "w") as f:
        f.write(readme_tables(csv_path))
    print(f"wrote {csv_path}, {table_path} and {len(plots)} plots into {args.out}")
    return 0


def run_table(args) -> int:
    from .table import readme_tables

    print(readme_tables(args.csv, sizes=args.sizes, d=args.dim), end="")
    return 0
