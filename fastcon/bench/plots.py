"""PNG plots of a benchmark CSV: time and peak memory against N, log-log, one line per provider."""

from __future__ import annotations

import math
import os
from collections import defaultdict

from .sweep import MEMORY, MODES, OOM, OOM_PREDICTED, TIME, read_csv


def _value(row) -> float:
    try:
        return float(row["median"])
    except ValueError:
        return math.nan


def _series(rows, **match) -> dict[str, list[tuple]]:
    """provider -> sorted [(N, median, p20, p80)] of the rows matching ``match``."""
    out = defaultdict(list)
    for row in rows:
        if all(row[k] == str(v) for k, v in match.items()):
            out[row["provider"]].append((int(row["N"]), _value(row), float(row["p20"]), float(row["p80"])))
    return {k: sorted(v) for k, v in sorted(out.items())}


def _out_of_memory(rows, **match) -> dict[str, int]:
    """provider -> the N at which it ran (or was predicted to run) out of memory."""
    out = {}
    for row in rows:
        if row["metric"] in (OOM, OOM_PREDICTED) and all(row[k] == str(v) for k, v in match.items()
                                                          if k != "mode"):
            out[row["provider"]] = min(int(row["N"]), out.get(row["provider"], 1 << 62))
    return out


def _tick(value: float, unit: str, larger: str, factor: float) -> str:
    if value <= 0:
        return ""
    if value >= factor:
        return f"{value / factor:.3g} {larger}"
    return f"{value:.3g} {unit}"


def format_mib(value: float, _position=None) -> str:
    """A memory tick in MiB as people write it: ``640 MiB``, ``1.5 GiB``."""
    return _tick(value, "MiB", "GiB", 1024)


def format_ms(value: float, _position=None) -> str:
    """A time tick in milliseconds as people write it: ``0.5 ms``, ``20 ms``, ``1.5 s``."""
    return _tick(value, "ms", "s", 1000)


def _memory_axis(axis) -> None:
    """Ticks at powers of two (512 MiB, 1 GiB, 2 GiB ...) labelled with their unit, not
    ``6.4x10^2``; on an axis spanning less than a factor of 4, quarter steps between them too."""
    from matplotlib.ticker import Formatter, LogLocator

    class Minor(Formatter):
        def __call__(self, value, position=None):
            low, high = sorted(self.axis.get_view_interval())
            return format_mib(value) if low > 0 and high / low < 4 else ""

    axis.set_major_locator(LogLocator(base=2))
    axis.set_minor_locator(LogLocator(base=2, subs=(1.25, 1.5, 1.75)))
    axis.set_major_formatter(format_mib)
    axis.set_minor_formatter(Minor())


def _time_axis(axis) -> None:
    """Decades labelled with their unit (``10 ms``, ``1 s``), and the minor ticks matplotlib's log
    formatter would label on a short axis."""
    from matplotlib.ticker import LogFormatter

    class Unit(LogFormatter):
        def __call__(self, value, position=None):
            return format_ms(value) if super().__call__(value, position) else ""

    axis.set_major_formatter(Unit(labelOnlyBase=False))
    axis.set_minor_formatter(Unit(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _draw(ax, series, oom, ylabel, title, axis_style=_time_axis):
    for provider, points in series.items():
        ns = [p[0] for p in points]
        med = [p[1] for p in points]
        line, = ax.plot(ns, med, marker="o", label=provider)
        ax.fill_between(ns, [p[2] for p in points], [p[3] for p in points], color=line.get_color(), alpha=0.2)
        if provider in oom and points:
            ax.plot([oom[provider]], [points[-1][1]], marker="x", markersize=10, color=line.get_color(),
                    linestyle="none")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    axis_style(ax.yaxis)
    ax.set_xlabel("N (rows = anchors)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def write_plots(csv_path: str, out_dir: str) -> list[str]:
    """One PNG of time (a panel per D and mode) and one of peak memory per (loss, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    idle = [float(r["median"]) for r in rows if r["provider"] == "idle"]
    rows = [r for r in rows if r["provider"] != "idle"]
    device = rows[0]["device name"] if rows else ""
    paths = []
    groups = sorted({(r["loss"], r["dtype"]) for r in rows})
    for loss, dtype in groups:
        dims = sorted({int(r["D"]) for r in rows if r["loss"] == loss and r["dtype"] == dtype})
        fig, axes = plt.subplots(len(dims), len(MODES), figsize=(5 * len(MODES), 4 * len(dims)), squeeze=False)
        for i, d in enumerate(dims):
            oom = _out_of_memory(rows, loss=loss, dtype=dtype, D=d)
            for j, mode in enumerate(MODES):
                series = _series(rows, loss=loss, dtype=dtype, D=d, mode=mode, metric=TIME)
                _draw(axes[i][j], series, oom, "time, median and p20-p80", f"{loss} {mode}, D={d}, {dtype}")
        paths.append(_finish(fig, axes, f"{loss}: time per call", device, os.path.join(out_dir, f"time_{loss}_{dtype}.png")))

        fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
        for i, d in enumerate(dims):
            oom = _out_of_memory(rows, loss=loss, dtype=dtype, D=d)
            series = _series(rows, loss=loss, dtype=dtype, D=d, mode="forward+backward", metric=MEMORY)
            _draw(axes[0][i], series, oom, "peak memory", f"{loss} forward+backward, D={d}, {dtype}", _memory_axis)
            if idle:
                axes[0][i].axhline(idle[0], color="gray", linestyle="--", linewidth=1,
                                   label="idle process (torch imported)")
        paths.append(_finish(fig, axes, f"{loss}: peak memory", device,
                             os.path.join(out_dir, f"memory_{loss}_{dtype}.png")))
    return paths


def _finish(fig, axes, title: str, device: str, path: str) -> str:
    """Legend, title and layout; save ``fig`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title} (x: out of memory at that N)\n{device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
