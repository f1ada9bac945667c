"""The shipped Triton kernels, compiled for sm_90 and sm_80 on this machine (no GPU needed):
no spills, pipelined plain column loops, and SupCon's forward + backward within budget.

Runs ``benchmarks/triton_static.py --quick`` (SupCon, the fixed and autotuned configurations,
sm_90 bf16 D=128 and sm_80 fp16 D=100) in a subprocess without ``TRITON_INTERPRET``, since
real cubins are compiled and other tests of this run may set the interpreter. Skipped only
when Triton cannot compile for CUDA here.
"""

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastcon.backends.triton import launch  # noqa: E402
from fastcon.bench.static_report import (LIMIT_INSTR_PER_ELEM, class_weighted, ctas_per_sm, model_exp_ms,  # noqa: E402
                                         model_ms, model_tensor_core_ms, pair_sums, problems, summary)
from fastcon.bench.triton_static import ARCHS, QUICK  # noqa: E402

# compiles the shipped kernels for sm_80/sm_90 (minutes): the slow suite
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("static") / "triton_static.csv")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_static.py"), "--quick",
                           "--out", out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3 and "cannot compile for CUDA" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, f"static report failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    print(proc.stdout)
    return rows


def test_every_quick_kernel_compiled(quick_rows):
    kernels = [r for r in quick_rows if r["kernel"] in ("stats", "grad")]
    expected = sum(len(launch.shipped_configs(k, launch.padded_dim(d), dtype, ARCHS[arch] // 10, "supcon"))
                   for arch, dtype, d in QUICK for k in ("stats", "grad"))
    assert len(kernels) == expected, "every shipped statistics and gradient configuration of the quick targets"
    assert not [r for r in quick_rows if r["note"].startswith("not compiled")]
    for r in kernels:
        assert int(r["loops"]) == 3, f"expected plain, special and positive loops: {r}"
        assert int(r["tensor_core_instr"]) > 0, f"half-precision products off the tensor cores: {r}"


def test_no_spills_and_pipelined_plain_loops(quick_rows):
    found = problems(quick_rows)
    assert not found, "shipped configurations with problems:\n" + "\n".join(found)


def test_supcon_instructions_per_element(quick_rows):
    stats, grad = pair_sums(quick_rows)[("supcon", "sm_90", "bfloat16", 128)]
    assert stats + grad <= LIMIT_INSTR_PER_ELEM, (
        f"SupCon forward + backward {stats:.2f} + {grad:.2f} thread-instructions per element on sm_90 "
        f"(fixed configurations), above {LIMIT_INSTR_PER_ELEM}")


def test_exponential_and_occupancy_columns(quick_rows):
    """The model's other bounds on the quick targets: at least one exponential per element in the
    statistics kernel's plain loop (the softmax), two in the gradient's (G_ij and G_ji of the
    symmetric sweep), the resident CTAs from the cubin's registers, and the three bounds printed."""
    fixed = {r["kernel"]: r for r in quick_rows if r["shipped"] == "fixed+autotune" and r["arch"] == "sm_90"
             and r["kernel"] in ("stats", "grad")}
    assert 1.0 <= float(fixed["stats"]["mufu_per_elem"]) < 1.5
    assert 2.0 <= float(fixed["grad"]["mufu_per_elem"]) < 2.5
    for r in quick_rows:
        if r["kernel"] in ("stats", "grad"):
            assert int(r["ctas_per_sm"]) >= 1 and r["occupancy_limit"], r
            if r["arch"] == "sm_90":
                assert float(r["model_exp_ms_n65536"]) > 0 and float(r["model_tensor_core_ms_n65536"]) > 0, r
    header = summary(quick_rows).splitlines()[0]
    assert "issue ms" in header and "exp ms" in header and "TC ms" in header and "CTAs/SM" in header


def test_model_bounds():
    """The H100 model's arithmetic: 16 exponentials per clock per SM against 4096 tensor-core flops
    per clock per SM, so at D = 128 one N^2 x D product takes as long as one exponential per element;
    the issue bound runs 128 thread-instructions per clock per SM."""
    assert model_tensor_core_ms("stats", 128) == pytest.approx(model_exp_ms(1.0))
    assert model_tensor_core_ms("grad", 128) == pytest.approx(2 * model_tensor_core_ms("stats", 128))
    assert model_ms(8.0) == pytest.approx(model_exp_ms(1.0))
    assert model_exp_ms(1.0) == pytest.approx(1e3 * 65536**2 / (132 * 16 * 1.755e9))


def test_occupancy_model():
    """CTAs per SM from registers (allocated per warp in units of 256), shared memory (plus 1 KiB
    per CTA) and warps, and which one limits them."""
    assert ctas_per_sm("sm_90", 71, 8, 81920) == (2, "shared memory")  # 2 x 81 KiB of 228 KiB
    assert ctas_per_sm("sm_90", 254, 4, 50176) == (2, "registers")  # 8192 per warp, 32768 per CTA
    assert ctas_per_sm("sm_90", 255, 8, 1024) == (1, "registers")
    assert ctas_per_sm("sm_90", 32, 4, 64) == (16, "registers")  # 1024 per warp: 64 warps, 16 CTAs
    assert ctas_per_sm("sm_90", 24, 2, 0) == (32, "warps")
    assert ctas_per_sm("sm_80", 64, 4, 81920) == (2, "shared memory")  # 164 KiB on sm_80


def test_configuration_lists():
    """Each padded D, dtype and target has a list; the fixed SupCon pair of the instruction
    budget (sm_90 bfloat16, DP = 128) is the one the budget was measured with."""
    for dp in (16, 32, 64, 128, 256):
        for dtype in ("bfloat16", "float16", "float32"):
            for major in (8, 9):
                for k in ("stats", "grad"):
                    for loss in ("supcon", "schane", "focal"):
                        configs = launch.shipped_configs(k, dp, dtype, major, loss)
                        assert configs and len(set(configs)) == len(configs)
                        assert all(bn // 2 >= 16 for _, bn, _, _ in configs), "the positive loop's dot needs BN/2 >= 16"
    assert launch.shipped_configs("stats", 128, "bfloat16", 9, "supcon")[0] == (128, 64, 8, 3)
    for loss in ("supcon", "schane", "focal"):
        assert launch.shipped_configs("grad", 128, "bfloat16", 9, loss)[0] == (64, 64, 4, 2)
    # float16 on sm_90: SupCon's 64x64 gradient tile holds without spills, SCHaNe's and focal's do not
    assert launch.shipped_configs("grad", 128, "float16", 9, "supcon")[0] == (64, 64, 4, 2)
    assert launch.shipped_configs("grad", 128, "float16", 9, "schane")[0] == (64, 32, 4, 3)


def test_class_weighted_ratios_count_the_masked_loops():
    """The class-weighted model: SupCon and focal add their positive loop over 1/C of the
    columns; SCHaNe's plain loop gives up that range to its masked loop."""
    def row(loss, kernel, plain, special, positive):
        return dict(loss=loss, kernel=kernel, dtype="bfloat16", arch="sm_90", D="128", shipped="fixed+autotune",
                    all_loops_instr_per_elem=f"plain:{plain} special:{special} positive:{positive}")
    rows = [row("supcon", "stats", 8, 12, 10), row("supcon", "grad", 12, 16, 30),
            row("schane", "stats", 10, 20, 20), row("schane", "grad", 16, 24, 30)]
    got = class_weighted(rows, classes=(2, 100))[("sm_90", "bfloat16", 128, "schane")]
    supcon = [20 + 40 / 2, 20 + 40 / 100]
    schane = [26 / 2 + 94 / 2, 26 * 0.99 + 94 / 100]
    assert got == pytest.approx([a / b for a, b in zip(schane, supcon)])


def test_committed_report_meets_the_targets():
    """The committed CSV (benchmarks/README.md says how it is made): no problems, SupCon within
    the instruction budget and SCHaNe / focal within 1.6x of it on sm_90 bf16 at D = 128."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "triton_static.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert not problems(rows), problems(rows)
    for r in rows:
        if r["kernel"] in ("stats", "grad") and r["config"] != "-" and not r["note"].startswith("not compiled"):
            assert int(r["ctas_per_sm"]) >= 1 and r["mufu_per_elem"], r
            if r["arch"] == "sm_90" and r["dtype"] != "float32":
                assert float(r["model_tensor_core_ms_n65536"]) > 0 and float(r["model_exp_ms_n65536"]) > 0, r
    sums = {k: s + g for k, (s, g) in pair_sums(rows).items() if None not in (s, g)}
    supcon = sums[("supcon", "sm_90", "bfloat16", 128)]
    assert supcon <= LIMIT_INSTR_PER_ELEM
    for loss in ("schane", "focal"):
        assert sums[(loss, "sm_90", "bfloat16", 128)] <= 1.6 * supcon, loss
    shipped = {(r["kernel"], r["loss"], r["dtype"], r["arch"], int(r["D"]), r["config"]) for r in rows}
    for arch, major in ARCHS.items():
        for dtype in ("bfloat16", "float16"):
            for loss in ("supcon", "schane", "focal"):
                for kernel in ("stats", "grad"):
                    for d in (64, 100, 128, 256):
                        for bm, bn, w, st in launch.shipped_configs(kernel, launch.padded_dim(d), dtype, major // 10,
                                                                    loss):
                            assert (kernel, loss, dtype, arch, d, f"{bm}x{bn} w{w} s{st}") in shipped, \
                                f"the committed report lacks {kernel} {loss} {dtype} {arch} D={d} {bm}x{bn}"
