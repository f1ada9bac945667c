"""The native backend's host work at small N: fewer operators per call than the dense algorithm."""

import pytest

import fastcon.native
from fastcon.bench import small_n

pytestmark = pytest.mark.skipif(not fastcon.native.is_available(), reason="the native kernel is not built")


@pytest.mark.parametrize("n", [64, 256])
def test_native_dispatches_fewer_operators_than_dense(n):
    native = small_n.operators(small_n.native_step, n)
    dense = small_n.operators(small_n.dense_step, n)
    assert 0 < native < dense, (native, dense)


def test_benchmark_rows_are_complete():
    (row,) = small_n.run([64], d=16, samples=1)
    assert row["N"] == 64 and row["ops_native"] < row["ops_dense"]
    assert row["us_native"] > 0 and row["us_dense"] > 0 and row["native_over_dense"] > 0
