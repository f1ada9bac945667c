"""The GPU check's parts, run on CPU: ``benchmarks/gpu_check.sh`` (syntax, steps), the
interleaved sweep and the call profile at tiny sizes (the CSV schema; the CUDA graph
contender skipped with its reason; out of memory recorded, not fatal), and the norm-relative
comparison of the GPU tests (rounding passes, a wrong coefficient fails)."""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import interleaved_sweep  # noqa: E402
import profile_calls  # noqa: E402
import stats_pair_ab  # noqa: E402

from tests.cases import CASES, make_inputs, run_loss  # noqa: E402
from tests.test_triton_gpu import assert_matches_exact, exact_reference  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gpu_check_script_parses_and_names_its_steps():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    out = subprocess.run(["bash", SCRIPT, "--dry-run"], check=True, capture_output=True, text=True).stdout
    steps = [line.split(" ", 1)[0] for line in out.splitlines()]
    assert steps == ["pytest", "sweep", "profile", "stats-ab"], out
    for script in ("tests/test_triton_gpu.py", "benchmarks/interleaved_sweep.py", "benchmarks/profile_calls.py",
                   "benchmarks/stats_pair_ab.py"):
        assert script in out and os.path.exists(os.path.join(ROOT, script)), script
    limits = [int(line.split("limit ")[1].split(" ")[0]) for line in out.splitlines()]
    assert sum(limits) <= 8 * 60 - 30, f"the steps' time limits add up to {sum(limits)} s"


def test_sweep_on_cpu_writes_every_contender(tmp_path):
    interleaved_sweep.main(["--device", "cpu", "--sizes", "64", "128", "--reps", "1", "--losses", "supcon",
                            "--dtypes", "float32", "--contenders", "eager", "cudagraph", "reference",
                            "--out", str(tmp_path)])
    name = interleaved_sweep.slug(interleaved_sweep.device_name(torch.device("cpu")))
    rows = _rows(tmp_path / f"speed_{name}.csv")
    assert rows and list(rows[0]) == list(interleaved_sweep.COLUMNS)
    assert (tmp_path / f"speed_{name}.md").read_text().count("| supcon | float32 |") == 2
    fast = interleaved_sweep.fast_backends(torch.device("cpu"))
    assert "blockwise" in fast
    for n in ("64", "128"):
        at = {(r["provider"], r["metric"]): r for r in rows if r["N"] == n}
        for provider in [f"fastcon-{b}" for b in fast] + ["reference"]:
            r = at[(provider, "time")]
            assert float(r["median"]) > 0 and r["unit"] == "ms" and int(r["reps"]) == 1, r
            assert float(at[(provider, "first_call")]["median"]) > 0
        skipped = at[(f"fastcon-{fast[0]}+cudagraph", "skipped")]
        assert skipped["note"] == "CUDA graphs need a CUDA device" and skipped["median"] == "nan"


def test_sweep_records_failures_and_stops_a_contender_out_of_memory(tmp_path, monkeypatch):
    setup, rep = interleaved_sweep.Contender.setup, interleaved_sweep.Contender.rep

    def short_of_memory(self):
        if self.provider == "reference" and self._x.shape[0] * 2 >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.18 GiB")
        setup(self)

    def fails_at_128(self):
        if self.provider == "fastcon-blockwise" and self._x.shape[0] * 2 == 128:
            raise RuntimeError("an error while timing")
        rep(self)

    monkeypatch.setattr(interleaved_sweep.Contender, "setup", short_of_memory)
    monkeypatch.setattr(interleaved_sweep.Contender, "rep", fails_at_128)
    interleaved_sweep.main(["--device", "cpu", "--sizes", "32", "64", "128", "--reps", "1", "--losses", "focal",
                            "--dtypes", "float32", "--contenders", "eager", "reference", "--out", str(tmp_path)])
    name = interleaved_sweep.slug(interleaved_sweep.device_name(torch.device("cpu")))
    rows = [r for r in _rows(tmp_path / f"speed_{name}.csv") if r["metric"] != "first_call"]
    ref = {r["N"]: r for r in rows if r["provider"] == "reference"}
    assert ref["32"]["metric"] == "time"
    assert ref["64"]["metric"] == "oom"
    assert ref["128"]["metric"] == "skipped" and ref["128"]["note"] == "out of memory at N = 64"
    blockwise = {r["N"]: r for r in rows if r["provider"] == "fastcon-blockwise"}
    assert blockwise["64"]["metric"] == "time"
    assert blockwise["128"]["metric"] == "failed" and "an error while timing" in blockwise["128"]["note"]


def test_sweep_keeps_to_its_time_budget(tmp_path):
    interleaved_sweep.main(["--device", "cpu", "--sizes", "32", "64", "--reps", "50", "--losses", "supcon",
                            "--dtypes", "float32", "--contenders", "reference", "--budget-s", "0",
                            "--out", str(tmp_path)])
    name = interleaved_sweep.slug(interleaved_sweep.device_name(torch.device("cpu")))
    rows = _rows(tmp_path / f"speed_{name}.csv")
    assert [r["metric"] for r in rows] == ["skipped", "skipped"]
    assert rows[0]["note"] == "time budget of 0 s spent"


def test_profile_on_cpu(tmp_path):
    profile_calls.main(["--device", "cpu", "--sizes", "64", "--calls", "2", "--backend", "blockwise",
                        "--out", str(tmp_path)])
    name = interleaved_sweep.slug(interleaved_sweep.device_name(torch.device("cpu")))
    rows = {r["metric"]: r for r in _rows(tmp_path / f"profile_{name}.csv")}
    assert set(rows) == {"kernels_per_call", "memops_per_call", "gpu_busy_ms_per_call", "wall_ms_per_call",
                         "busy_fraction", "sync_warnings"}
    assert float(rows["kernels_per_call"]["median"]) >= 1
    assert float(rows["wall_ms_per_call"]["median"]) > 0
    assert math.isnan(float(rows["sync_warnings"]["median"]))
    assert "needs a CUDA device" in rows["sync_warnings"]["note"]


def test_profile_union_of_intervals():
    assert profile_calls._union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case_name", ["v3_imbalanced", "v2_ref"])
def test_gpu_comparison_passes_rounding_and_fails_a_wrong_coefficient(case_name, reduction):
    """The GPU tests' comparison (:func:`tests.test_triton_gpu.assert_matches_exact`) on the two
    SupCon cases whose bfloat16 gradients once failed an elementwise tolerance by one element:
    the reference on the bfloat16 inputs, plus noise of the tensor-core products' size (0.5%
    per element), passes; the gradient halved, or 10% too large, fails."""
    case = next(c for c in CASES if c.name == case_name)
    dtype = torch.bfloat16
    feats, labels, ref, ref_labels = make_inputs(case, dtype=dtype)
    want = exact_reference("supcon", case, feats, labels, ref, ref_labels, reduction)
    got = run_loss("supcon", case, feats, labels, ref, ref_labels, backend="reference", reduction=reduction)
    g = torch.Generator().manual_seed(0)

    def noisy(t):
        return None if t is None else (t.double() * (1 + 5e-3 * torch.randn(t.shape, generator=g,
                                                                            dtype=torch.float64))).to(t.dtype)

    assert_matches_exact(got, want, dtype)
    assert_matches_exact((got[0], noisy(got[1]), noisy(got[2])), want, dtype)
    for factor in (0.5, 1.1):
        with pytest.raises(AssertionError, match="features gradient"):
            assert_matches_exact((got[0], got[1] * factor, got[2]), want, dtype)
    if ref is not None:
        with pytest.raises(AssertionError, match="ref_features gradient"):
            assert_matches_exact((got[0], got[1], got[2] * 0.5), want, dtype)
    with pytest.raises(AssertionError, match="loss"):
        assert_matches_exact((got[0] * 1.05, got[1], got[2]), want, dtype)


PAIR_CHECK = """
import torch
import fastcon.backends.triton.kernels as K
from tests.cases import Case, assert_matches_reference
assert "carried" in open(K.__file__).read(), K.__file__
for n in (70, 83, 96):  # odd and even counts of plain tiles of 16 columns
    case = Case("tiles", b=n, v=None, d=20, labels=tuple(i % 7 for i in range(n)))
    for kind in ("supcon", "schane", "focal"):
        assert_matches_reference(kind, case, backend="triton", dtype=torch.float32, reduction="none")
"""


def test_pair_loop_variant_builds_from_the_shipped_loop(tmp_path):
    """The GPU check's A/B finds the shipped plain loop in the statistics kernel and replaces it."""
    tree = stats_pair_ab.variant_tree(str(tmp_path))
    src = open(os.path.join(tree, stats_pair_ab.KERNELS)).read()
    assert stats_pair_ab.PAIR_LOOP in src and stats_pair_ab.SHIPPED_LOOP not in src


@pytest.mark.slow
def test_pair_loop_variant_matches_reference_interpreted(tmp_path):
    """The A/B's variant computes the same statistics (Triton interpreter, 16-column tiles)."""
    pytest.importorskip("triton")
    tree = stats_pair_ab.variant_tree(str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, ROOT]), TRITON_INTERPRET="1", FASTCON_TRITON_TILE="16")
    proc = subprocess.run([sys.executable, "-c", PAIR_CHECK], env=env, cwd=tree, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
