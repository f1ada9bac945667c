"""The README tables, made from a benchmark CSV (``fastcon bench-table results.csv``).

Two questions users choose a loss library by: how large a batch fits in memory, and
how much faster a training step is. Both tables are computed from the CSV only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .sweep import MEMORY, OOM, OOM_PREDICTED, TIME, read_csv

TRAINING = "forward+backward"


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _pick(rows, **match) -> list[dict]:
    return [r for r in rows if all(r[k] == str(v) for k, v in match.items())]


def _providers(rows, loss) -> list[str]:
    names = sorted({r["provider"] for r in rows if r["loss"] == loss})
    # fastcon's backends first, then the dense ones
    return sorted(names, key=lambda p: (not p.startswith("fastcon-"), p))


def _fmt_mib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def _fmt_ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else f"{ms:.1f} ms"


def capacity_table(rows, loss: str = "supcon", dtype: str = "float32") -> str:
    """Largest N each provider ran (training, within the budget) per D, and where it ran out."""
    dims = sorted({int(r["D"]) for r in rows if r["loss"] == loss and r["dtype"] == dtype})
    lines = ["| provider | " + " | ".join(f"largest N, D={d} (peak memory)" for d in dims) + " |",
             "|---|" + "---|" * len(dims)]
    for provider in _providers(rows, loss):
        cells = []
        for d in dims:
            mem = _pick(rows, loss=loss, provider=provider, D=d, dtype=dtype, mode=TRAINING, metric=MEMORY)
            if not mem:
                cells.append("-")
                continue
            best = max(mem, key=lambda r: int(r["N"]))
            cell = f"{int(best['N'])} ({_fmt_mib(_num(best['median']))})"
            ooms = [r for r in rows if r["loss"] == loss and r["provider"] == provider and r["D"] == str(d)
                    and r["dtype"] == dtype and r["metric"] in (OOM, OOM_PREDICTED)]
            if ooms:
                first = min(ooms, key=lambda r: int(r["N"]))
                how = "predicted " + _fmt_mib(_num(first["median"])) if first["metric"] == OOM_PREDICTED \
                    else "ran out"
                cell += f"; N={first['N']} out of memory ({how})"
            else:
                cell += "; largest N swept"
            cells.append(cell)
        lines.append(f"| {provider} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(rows, loss: str = "supcon", sizes: Sequence[int] = (4096, 16384), d: int = 128,
                dtype: str = "float32", mode: str = TRAINING) -> str:
    """Median time per provider at fixed N, and each one's time divided by fastcon's."""
    providers = _providers(rows, loss)
    fast = [p for p in providers if p.startswith("fastcon-") and p != "fastcon-reference"]
    header = ["provider"]
    for n in sizes:
        header.append(f"N={n}: time")
        header += [f"N={n}: time / {f}" for f in fast]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]

    def median(provider, n) -> float | None:
        hit = _pick(rows, loss=loss, provider=provider, N=n, D=d, dtype=dtype, mode=mode, metric=TIME)
        return _num(hit[0]["median"]) if hit else None

    for provider in providers:
        cells = [provider]
        for n in sizes:
            t = median(provider, n)
            oom = any(r["metric"] in (OOM, OOM_PREDICTED) and r["N"] == str(n) for r in
                      _pick(rows, loss=loss, provider=provider, D=d, dtype=dtype))
            cells.append(_fmt_ms(t) if t is not None else ("out of memory" if oom else "-"))
            for f in fast:
                tf = median(f, n)
                cells.append(f"{t / tf:.2f}x" if t is not None and tf else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def idle_floor(rows) -> float | None:
    hit = [r for r in rows if r["provider"] == "idle"]
    return _num(hit[0]["median"]) if hit else None


def _sizes_present(rows, sizes: Sequence[int], d: int) -> list[int]:
    """``sizes`` that SupCon was timed at; else the largest N every SupCon provider was timed at
    (a quick sweep stops below the README's N)."""
    timed = _pick(rows, loss="supcon", D=d, dtype="float32", mode=TRAINING, metric=TIME)
    present = [n for n in sizes if any(r["N"] == str(n) for r in timed)]
    if present:
        return present
    per_provider = {}
    for r in timed:
        per_provider.setdefault(r["provider"], set()).add(int(r["N"]))
    common = set.intersection(*per_provider.values()) if per_provider else set()
    return [max(common)] if common else []


def readme_tables(csv_path: str, sizes: Sequence[int] = (4096, 16384), d: int = 128) -> str:
    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    device = rows[-1]["device name"]
    sizes = _sizes_present(rows, sizes, d)
    parts = [(f"Measured on {device}, fastcon {rows[-1]['fastcon version']} "
              f"({min(r['timestamp'] for r in rows)[:10]}); regenerate with `fastcon bench` "
              f"and `fastcon bench-table {csv_path}`.")]
    floor = idle_floor(rows)
    budget_note = ""
    if floor is not None:
        budget_note = (f" Peak memory is the peak resident set of a fresh process per point; "
                       f"a process that only imported torch and fastcon holds {_fmt_mib(floor)}.")
    parts.append(f"\n**Largest batch (SupCon, forward+backward, float32).**{budget_note}\n")
    parts.append(capacity_table(rows, "supcon", "float32"))
    parts.append(f"\n**SupCon training step (forward+backward), D={d}, float32.** "
                 "\"time / fastcon-X\" above 1 means fastcon-X is that many times faster.\n")
    parts.append(speed_table(rows, "supcon", sizes, d, "float32", TRAINING))
    parts.append(f"\n**SupCon forward only (evaluation), D={d}, float32.**\n")
    parts.append(speed_table(rows, "supcon", sizes, d, "float32", "forward"))
    for loss in ("schane", "focal", "clce"):
        if any(r["loss"] == loss for r in rows):
            parts.append(f"\n**{loss} training step, D={d}, float32: fastcon vs the dense reference.**\n")
            parts.append(speed_table(rows, loss, sizes, d, "float32", TRAINING))
    return "\n".join(parts) + "\n"


def ratio(rows, loss: str, slow: str, fast: str, n: int, d: int = 128, dtype: str = "float32",
          mode: str = TRAINING) -> float | None:
    """``time(slow) / time(fast)`` at one point, or None when either is missing."""
    a = _pick(rows, loss=loss, provider=slow, N=n, D=d, dtype=dtype, mode=mode, metric=TIME)
    b = _pick(rows, loss=loss, provider=fast, N=n, D=d, dtype=dtype, mode=mode, metric=TIME)
    if not a or not b:
        return None
    return _num(a[0]["median"]) / _num(b[0]["median"])


