"""The benchmark: its stand-ins for the published codes compute fastcon's reference loss,
its sweep records out-of-memory points instead of crashing, and ``fastcon bench`` writes
a CSV of the agreed schema with finite figures, the plots and the README tables."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcon.functional as FC
from fastcon.bench import sweep
from fastcon.bench.point import make_inputs
from fastcon.bench.providers import available_providers
from fastcon.bench.supcontrast import supcontrast_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _features(b, v, d, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, v, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (b,), generator=g)
    return feats, labels


@pytest.mark.parametrize("b,v,d,classes", [(13, 2, 7, 4), (11, 3, 5, 3), (9, 2, 6, 9)])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_supcontrast_algorithm_matches_reference(b, v, d, classes, contrast_mode):
    feats, labels = _features(b, v, d, classes)
    x1 = feats.clone().requires_grad_(True)
    x2 = feats.clone().requires_grad_(True)
    published = supcontrast_loss(F.normalize(x1, dim=-1), labels, temperature=0.1, base_temperature=0.07,
                                 contrast_mode=contrast_mode)
    ours = FC.supcon_loss(x2, labels, temperature=0.1, base_temperature=0.07, contrast_mode=contrast_mode,
                          backend="reference")
    published.backward()
    ours.backward()
    torch.testing.assert_close(published, ours, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


def test_supcontrast_without_labels_is_simclr():
    feats, _ = _features(8, 2, 5, 1)
    published = supcontrast_loss(F.normalize(feats, dim=-1))
    torch.testing.assert_close(published, FC.supcon_loss(feats, backend="reference"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["supcon", "schane", "focal", "clce"])
def test_every_provider_computes_the_reference_loss(loss):
    # through the benchmark's own input path (view-major flattening for pytorch-metric-learning)
    providers, _ = available_providers(torch.device("cpu"))
    names = [p.name for p in providers]
    assert "fastcon-blockwise" in names and "reference" in names and "supcontrast" in names
    feats, labels, logits = make_inputs(loss, 96, 16, torch.float64, "cpu", seed=3)
    results = {}
    for provider in providers:
        if loss not in provider.losses:
            continue
        x = feats.clone().requires_grad_(True)
        value = provider.build(loss)(x, labels, logits)
        value.backward()
        results[provider.name] = (value.detach(), x.grad)
    expected_loss, expected_grad = results.pop("reference")
    assert results, "no provider besides the reference"
    for name, (value, grad) in results.items():
        torch.testing.assert_close(value.to(torch.float64), expected_loss, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-8, msg=name)


def test_pytorch_metric_learning_provider_present():
    pytest.importorskip("pytorch_metric_learning")
    providers, _ = available_providers(torch.device("cpu"))
    assert "pytorch-metric-learning" in [p.name for p in providers]


def test_percentile_interpolates():
    assert sweep.percentile([5.0], 20) == 5.0
    assert sweep.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert sweep.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 20) == pytest.approx(1.8)
    assert sweep.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 80) == pytest.approx(4.2)


def test_predict_peak_follows_the_measured_growth():
    floor = 500.0
    assert sweep.predict_peak([], 256, floor) is None
    quadratic = [(1024, floor + 100.0), (2048, floor + 400.0)]
    assert sweep.predict_peak(quadratic, 4096, floor) == pytest.approx(floor + 1600.0)
    linear = [(1024, floor + 100.0), (2048, floor + 200.0)]
    assert sweep.predict_peak(linear, 4096, floor) == pytest.approx(floor + 400.0)
    # flat at small N (fixed costs): never predicted to grow slower than linearly
    flat = [(256, floor + 50.0), (512, floor + 50.0)]
    assert sweep.predict_peak(flat, 1024, floor) == pytest.approx(floor + 100.0)
    # a single point: assumed quadratic
    assert sweep.predict_peak([(512, floor + 10.0)], 1024, floor) == pytest.approx(floor + 40.0)


def _fake_point(peak_of_n, calls):
    def run_point(task, budget_mib, timeout=3600.0):
        calls.append(task["N"])
        peak = peak_of_n(task["N"])
        records = [{"mode": "forward", "times_ms": [1.0, 2.0, 3.0], "peak_mib": peak * 0.9},
                   {"mode": "backward", "times_ms": [1.0, 1.0, 1.0]},
                   {"mode": "forward+backward", "times_ms": [2.0, 3.0, 4.0], "peak_mib": peak}]
        return sweep.PointResult(records=records, seconds=0.1)

    return run_point


def test_sweep_records_predicted_out_of_memory_without_running_it(tmp_path, monkeypatch):
    calls = []
    floor = 500.0
    monkeypatch.setattr(sweep, "idle_floor_mib", lambda device: floor)
    monkeypatch.setattr(sweep, "run_point", _fake_point(lambda n: floor + n * n / 2**16, calls))
    config = sweep.SweepConfig(losses=("supcon",), providers=("supcontrast",), dims=(128,),
                               sizes=(256, 512, 1024, 2048, 4096), budget_mib=floor + 100.0)
    path = sweep.run_sweep(config, "cpu", str(tmp_path), log=lambda *a: None)
    # peaks above the floor: 1, 4, 16, 64 MiB; 4096 would need 256 more -> predicted out of memory
    assert calls == [256, 512, 1024, 2048]
    rows = sweep.read_csv(path)
    oom = [r for r in rows if r["metric"] == sweep.OOM_PREDICTED]
    assert len(oom) == 1 and oom[0]["N"] == "4096" and oom[0]["provider"] == "supcontrast"
    assert float(oom[0]["median"]) == pytest.approx(floor + 256.0)
    times = [r for r in rows if r["metric"] == sweep.TIME and r["mode"] == "forward+backward"]
    assert [r["N"] for r in times] == ["256", "512", "1024", "2048"]
    assert float(times[0]["median"]) == 3.0 and float(times[0]["p20"]) == pytest.approx(2.4)


def test_sweep_records_a_point_killed_for_memory(tmp_path):
    # a budget far below what any process needs: the real point process is stopped at once
    config = sweep.SweepConfig(losses=("supcon",), providers=("reference",), dims=(16,), sizes=(256, 512),
                               min_reps=1, max_reps=1, min_time=0.0, budget_mib=1.0)
    path = sweep.run_sweep(config, "cpu", str(tmp_path), log=lambda *a: None)
    rows = [r for r in sweep.read_csv(path) if r["provider"] == "reference"]
    assert len(rows) == 1, rows  # the series stops at its first out-of-memory point
    assert rows[0]["metric"] == sweep.OOM and rows[0]["N"] == "256" and math.isnan(float(rows[0]["median"]))


def test_fastcon_bench_writes_csv_plots_and_tables(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "fastcon", "bench", "--quick", "--sizes", "256", "512",
           "--losses", "supcon", "clce", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(out / "results.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, r)) for r in reader]
    assert tuple(header) == sweep.CSV_COLUMNS
    assert header == ["loss", "provider", "mode", "metric", "unit", "N", "D", "dtype", "median", "p20", "p80",
                      "device name", "fastcon version", "timestamp"]
    measured = [r for r in rows if r["metric"] in (sweep.TIME, sweep.MEMORY)]
    for r in measured:
        values = [float(r["median"]), float(r["p20"]), float(r["p80"])]
        assert all(math.isfinite(v) and v > 0 for v in values), r
        assert float(r["p20"]) <= float(r["median"]) <= float(r["p80"]), r
    providers_by_loss = {(r["loss"], r["provider"]) for r in measured if r["provider"] != "idle"}
    expected = {("supcon", "fastcon-blockwise"), ("supcon", "reference"), ("supcon", "supcontrast"),
                ("clce", "fastcon-blockwise"), ("clce", "reference")}
    assert expected <= providers_by_loss
    for loss, provider in providers_by_loss:
        for n in ("256", "512"):
            modes = {r["mode"] for r in measured if (r["loss"], r["provider"], r["N"]) == (loss, provider, n)
                     and r["metric"] == sweep.TIME}
            assert modes == set(sweep.MODES), (loss, provider, n)
    idle = [r for r in rows if r["provider"] == "idle"]
    assert len(idle) == 1 and float(idle[0]["median"]) > 10  # MiB of a process with torch imported

    for name in ("time_supcon_float32.png", "memory_supcon_float32.png", "time_clce_float32.png",
                 "memory_clce_float32.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    table = (out / "table.md").read_text()
    assert "| supcontrast |" in table and "| fastcon-blockwise |" in table

    proc = subprocess.run([sys.executable, "-m", "fastcon", "bench-table", str(out / "results.csv")],
                          capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == table


def test_triton_extra_memory_at_65536_rows_is_within_64_mb():
    """benchmarks/triton_memory.py: the Triton engine's buffers (kernels stubbed, host code real)
    at N = 65536, D = 128, bfloat16 stay under 64 MB beyond the inputs and the gradient."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    proc = subprocess.run([sys.executable, "benchmarks/triton_memory.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = [float(x) for x in re.findall(r"extra\s+([\d.]+) MiB", proc.stdout)]
    assert len(figures) == 3 and all(0 < f <= 64 for f in figures), proc.stdout
