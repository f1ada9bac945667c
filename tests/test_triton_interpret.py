"""Runs the Triton backend's interpreted suite (``tests/triton_cases_interpret.py``) in a
subprocess with ``TRITON_INTERPRET=1``, so the variable never reaches other tests.

The kernels themselves run (on CPU, through Triton's interpreter) and are compared
with the dense reference; this test fails when any of them fails or is skipped.
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interpreted(selection, minimum):
    env = dict(os.environ, TRITON_INTERPRET="1", FASTCON_TRITON_TILE="16", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/triton_cases_interpret.py", "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-W", "ignore::RuntimeWarning"] + selection,
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"interpreted Triton suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= minimum, f"too few interpreted tests ran: {summary!r}"
    assert not re.search(r"skipped|xfail", summary), f"interpreted tests were skipped: {summary!r}"


def test_triton_kernels_interpreted_small_cases():
    """Every loss on every small case, float32, reduction "mean": the quick suite's Triton check."""
    _interpreted(["-k", "test_matches_reference_float32 and mean"], 15)


@pytest.mark.slow
def test_triton_kernels_interpreted_match_reference():
    """The whole interpreted suite: every case, reduction and dtype, splits, the host path's checks."""
    _interpreted([], 150)
