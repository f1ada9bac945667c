"""The measuring helpers every benchmark shares (``fastcon bench`` and the scripts in
``benchmarks/``): peak and current resident memory, quantiles, CSV rows."""

from __future__ import annotations

import csv
import os
import resource


def peak_rss_mib() -> float:
    """This process's peak resident set so far (``ru_maxrss``; it only grows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def current_rss_mib() -> float:
    """This process's resident set now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def quantile(xs, q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def write_rows(path, rows) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
