"""The benchmark sweep: which points to measure, in which order, and the CSV they make.

Each series (loss, provider, D, dtype) runs N = 256, 512, ... until the provider runs
out of its memory budget or the sweep's largest N. Every point runs in a fresh process
(:mod:`fastcon.bench.point`) so that its peak resident memory is its own, and so that
a process killed for memory is recorded instead of ending the sweep. On CPU the sweep
also predicts a point's peak from the series' measured peaks before starting it, and
records the point as out of memory without running it when the prediction exceeds the
budget (an allocation of 36 GB on a 24 GB machine would otherwise stall it swapping or
have the kernel kill whatever process it picks), and watches each process's resident
memory while it runs, stopping it when it crosses the budget.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

CSV_COLUMNS = ("loss", "provider", "mode", "metric", "unit", "N", "D", "dtype", "median", "p20", "p80",
               "device name", "fastcon version", "timestamp")
MODES = ("forward", "backward", "forward+backward")
# metric names of the CSV; out-of-memory points carry the predicted peak (or NaN when a
# process really ran out) so that "where does each provider stop" is in the same file
TIME, MEMORY, OOM_PREDICTED, OOM = "time", "peak_memory", "oom_predicted", "oom"


@dataclass(frozen=True)
class SweepConfig:
    losses: tuple[str, ...] = ("supcon", "schane", "focal", "clce")
    providers: tuple[str, ...] | None = None  # None: every provider available on the device
    dims: tuple[int, ...] = (128, 768)
    # D after the first is swept for these losses only (None: all): SupCon, where fastcon
    # meets the published codes; the other losses compare fastcon with its own reference
    wide_dim_losses: tuple[str, ...] | None = ("supcon",)
    sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    dtypes: tuple[str, ...] = ("float32",)
    min_reps: int = 3
    max_reps: int = 15
    min_time: float = 1.0  # seconds of repeats per mode, once min_reps are done
    budget_mib: float = 20 * 1024.0
    # fastcon's memory grows linearly, so its series would go on past the dense ones at
    # a minute and more per point: they stop at fast_max_n, except for the (loss, D) pairs
    # listed in fast_max_n_for, which show how far beyond the dense codes fastcon goes
    fast_max_n: int | None = 16384
    fast_max_n_for: tuple[tuple[str, int, int], ...] = (("supcon", 128, 32768),)
    # largest N of a loss for every provider: CLCE costs SCHaNe's sweep plus a cross-entropy
    # over [N, C] logits, so its large points would repeat SCHaNe's at minutes each
    loss_max_n: tuple[tuple[str, int], ...] = (("clce", 4096),)

    def dims_for(self, loss: str) -> tuple[int, ...]:
        if self.wide_dim_losses is None or loss in self.wide_dim_losses:
            return self.dims
        return self.dims[:1]

    def sizes_for(self, loss: str, d: int, provider) -> tuple[int, ...]:
        limit = None  # the dense codes stop where they run out of memory
        if provider.is_fastcon:
            limit = self.fast_max_n
            for rule_loss, rule_d, rule_n in self.fast_max_n_for:
                if (rule_loss, rule_d) == (loss, d):
                    limit = rule_n
        for rule_loss, rule_n in self.loss_max_n:
            if rule_loss == loss:
                limit = rule_n if limit is None else min(limit, rule_n)
        return tuple(n for n in self.sizes if limit is None or n <= limit)


FULL = SweepConfig()
QUICK = SweepConfig(dims=(128,), sizes=(256, 512, 1024), min_reps=2, max_reps=5, min_time=0.2, loss_max_n=())


def default_config(device: str, quick: bool) -> SweepConfig:
    config = QUICK if quick else FULL
    if device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**20
        config = replace(config, dtypes=("float32", "bfloat16"), budget_mib=0.9 * total)
        if not quick:
            config = replace(config, sizes=config.sizes + (65536, 131072), fast_max_n=None)
    return config


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100])."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def predict_peak(history: Sequence[tuple[int, float]], n: int, floor_mib: float) -> float | None:
    """Predicted peak (MiB) at ``n`` from the series' measured ``(N, peak)`` points.

    The memory above the idle floor grows like ``N^p``; ``p`` is the log-log slope of the last
    two points, clamped to [1, 2] (at small N fixed costs flatten the slope, and no provider
    needs more than the N x N matrices). With one point, growth is assumed quadratic.
    """
    if not history:
        return None
    n_last, peak_last = history[-1]
    excess_last = max(peak_last - floor_mib, 1.0)
    slope = 2.0
    if len(history) >= 2:
        n_prev, peak_prev = history[-2]
        excess_prev = max(peak_prev - floor_mib, 1.0)
        slope = math.log(excess_last / excess_prev) / math.log(n_last / n_prev)
        slope = min(2.0, max(1.0, slope))
    return floor_mib + excess_last * (n / n_last) ** slope


@dataclass
class PointResult:
    records: list[dict] = field(default_factory=list)  # the JSON lines of the point process
    killed_for_memory: bool = False
    error: str = ""
    seconds: float = 0.0


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def run_point(task: dict, budget_mib: float | None, timeout: float = 3600.0) -> PointResult:
    """Run one point in a fresh process; on CPU stop it when its resident memory exceeds the budget."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "fastcon.bench.point", json.dumps(task)]
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    # files, not pipes: the loop below does not read while it watches, and a full pipe
    # would stall the point
    out_file, err_file = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, text=True, env=env)
    result = PointResult()
    watch = budget_mib is not None and os.path.exists(f"/proc/{proc.pid}/statm")
    while proc.poll() is None:
        if watch and _rss_mib(proc.pid) > budget_mib:
            proc.kill()
            result.killed_for_memory = True
            break
        if time.perf_counter() - start > timeout:
            proc.kill()
            result.error = f"timed out after {timeout:.0f} s"
            break
        time.sleep(0.05)
    proc.wait()
    out_file.seek(0)
    err_file.seek(0)
    out, err = out_file.read(), err_file.read()
    out_file.close()
    err_file.close()
    result.seconds = time.perf_counter() - start
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            result.records.append(json.loads(line))
    if proc.returncode == -9 and not result.killed_for_memory and not result.error:
        result.killed_for_memory = True  # SIGKILL from outside: the kernel's out-of-memory killer
    elif proc.returncode not in (0, None) and not result.killed_for_memory and not result.error:
        result.error = err.strip().splitlines()[-1] if err.strip() else f"exit status {proc.returncode}"
    return result


def idle_floor_mib(device: str) -> float:
    """Peak resident memory of a process that only imported torch and fastcon."""
    res = run_point({"idle": True, "device": device}, budget_mib=None, timeout=300)
    for rec in res.records:
        if "idle_peak_mib" in rec:
            return float(rec["idle_peak_mib"])
    raise RuntimeError(f"the idle baseline process failed: {res.error}")


class CsvWriter:
    def __init__(self, path: str, device_name: str, version: str):
        self.path = path
        self.device_name = device_name
        self.version = version
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(CSV_COLUMNS)

    def row(self, loss, provider, mode, metric, unit, n, d, dtype, median, p20, p80):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.writer.writerow([loss, provider, mode, metric, unit, n, d, dtype,
                              f"{median:.6g}", f"{p20:.6g}", f"{p80:.6g}",
                              self.device_name, self.version, stamp])
        self.file.flush()

    def close(self):
        self.file.close()


def plan(config: SweepConfig, providers) -> list[tuple[str, object, int, str]]:
    """The series to run: ``(loss, provider, D, dtype)``."""
    series = []
    for loss in config.losses:
        for provider in providers:
            if loss not in provider.losses:
                continue
            if config.providers is not None and provider.name not in config.providers:
                continue
            for d in config.dims_for(loss):
                for dtype in config.dtypes:
                    series.append((loss, provider, d, dtype))
    return series


# Seconds per N^2 of one SupCon training step (a + b * D), the cost of the other losses
# relative to it, and the forward pass's share, measured on the 2-core CPU the committed
# results come from; used only to print how long a sweep will take.
_STEP_COST = {"dense": (3.7e-8, 5.8e-11), "fast": (5.4e-9, 2.9e-11)}
_LOSS_COST = {"dense": {"supcon": 1.0, "schane": 2.6, "focal": 2.0, "clce": 2.6},
              "fast": {"supcon": 1.0, "schane": 3.7, "focal": 4.0, "clce": 3.7}}
_FORWARD_SHARE = {"dense": 0.5, "fast": 0.35}
_DENSE_BYTES_PER_PAIR = 36.0  # measured peak of the dense codes per N^2 entry, training
_PROCESS_SECONDS = 2.5


def expected_seconds(config: SweepConfig, series, floor_mib: float = 500.0) -> float:
    """A rough duration of the sweep on a CPU like the reference one (2 cores)."""
    total = 0.0
    for loss, provider, d, dtype in series:
        kind = "fast" if provider.is_fastcon else "dense"
        for n in config.sizes_for(loss, d, provider):
            if kind == "dense" and floor_mib + _DENSE_BYTES_PER_PAIR * n * n / 2**20 > config.budget_mib:
                break
            a, b = _STEP_COST[kind]
            step = n * n * (a + b * d) * _LOSS_COST[kind].get(loss, 1.0)
            forward = _FORWARD_SHARE[kind] * step
            # one untimed run and at least min_reps timed ones per mode
            total += _PROCESS_SECONDS + step + forward
            total += max(config.min_reps * step, config.min_time) + max(config.min_reps * forward, config.min_time)
    return total


def run_sweep(config: SweepConfig, device: str, out_dir: str, log=print) -> str:
    """Run the sweep, write ``results.csv`` into ``out_dir`` and return its path."""
    import torch

    import fastcon

    from .point import device_name as describe_device
    from .providers import available_providers

    os.makedirs(out_dir, exist_ok=True)
    providers, skipped = available_providers(torch.device(device))
    for name, why in skipped:
        log(f"skipping provider {name}: {why}")
    series = plan(config, providers)
    cpu = device == "cpu"
    floor = idle_floor_mib(device) if cpu else 0.0
    if cpu:
        log(f"{len(series)} series on {device}; expected duration about "
            f"{expected_seconds(config, series, floor) / 60:.0f} min on an idle 2-core CPU")
    else:
        log(f"{len(series)} series on {device}")
    path = os.path.join(out_dir, "results.csv")
    writer = CsvWriter(path, describe_device(torch.device(device)), fastcon.__version__)
    if cpu:
        writer.row("", "idle", "idle", MEMORY, "MiB", 0, 0, "", floor, floor, floor)
    started = time.perf_counter()
    try:
        for index, (loss, provider, d, dtype) in enumerate(series):
            history: list[tuple[int, float]] = []
            for n in config.sizes_for(loss, d, provider):
                label = f"[{index + 1}/{len(series)}] {loss} {provider.name} D={d} {dtype} N={n}"
                predicted = predict_peak(history, n, floor) if cpu else None
                if predicted is not None and predicted > config.budget_mib:
                    writer.row(loss, provider.name, "forward+backward", OOM_PREDICTED, "MiB", n, d, dtype,
                               predicted, predicted, predicted)
                    log(f"{label}: predicted peak {predicted / 1024:.1f} GiB > budget, recorded as out of memory")
                    break
                task = {"device": device, "loss": loss, "provider": provider.name, "N": n, "D": d,
                        "dtype": dtype, "min_reps": config.min_reps, "max_reps": config.max_reps,
                        "min_time": config.min_time}
                result = run_point(task, config.budget_mib if cpu else None)
                peak = _write_point(writer, result, loss, provider.name, n, d, dtype)
                if result.error:
                    raise RuntimeError(f"{label} failed: {result.error}")
                if peak is None:
                    log(f"{label}: out of memory ({result.seconds:.0f} s)")
                    break
                history.append((n, peak))
                log(f"{label}: done in {result.seconds:.1f} s, peak {peak:.0f} MiB "
                    f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)")
    finally:
        writer.close()
    return path


def _write_point(writer: CsvWriter, result: PointResult, loss, provider, n, d, dtype) -> float | None:
    """Write a point's rows; return its training peak (MiB), or None when it ran out of memory."""
    peak = None
    done = set()
    for rec in result.records:
        mode = rec.get("mode")
        if rec.get("oom"):
            writer.row(loss, provider, mode, OOM, "MiB", n, d, dtype, math.nan, math.nan, math.nan)
            return None
        if mode is None:
            continue
        times = rec["times_ms"]
        writer.row(loss, provider, mode, TIME, "ms", n, d, dtype, statistics.median(times),
                   percentile(times, 20), percentile(times, 80))
        if "peak_mib" in rec:
            writer.row(loss, provider, mode, MEMORY, "MiB", n, d, dtype, rec["peak_mib"], rec["peak_mib"],
                       rec["peak_mib"])
            if mode == "forward+backward":
                peak = rec["peak_mib"]
        done.add(mode)
    if result.killed_for_memory:
        missing = [m for m in ("forward", "forward+backward") if m not in done][:1]
        for mode in missing:
            writer.row(loss, provider, mode, OOM, "MiB", n, d, dtype, math.nan, math.nan, math.nan)
        return None
    return peak


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
