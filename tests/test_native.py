"""The native C++ kernel (kernels/, built by CMakeLists.txt) against the dense reference: the
blockwise suite (odd shapes, every loss, every reduction, training dtypes), shapes that span
several row blocks and column tiles, float64 gradcheck, and results that do not depend on the
thread count.

CI builds the kernel before running this file; without the build the module is skipped."""

import pytest
import torch

import fastcon.functional as FC
from fastcon import native
import fastcon.backends as backends
from tests.cases import LOSSES, Case, assert_matches_reference, cases_for, loss_fn, make_inputs

pytestmark = pytest.mark.skipif(
    not native.is_available(),
    reason=f"native kernel not built (cmake -S . -B build && cmake --build build): {native.import_error()}",
)

PARAMS = [(k, c) for k in LOSSES for c in cases_for(k)]
IDS = [f"{k}-{c.name}" for k, c in PARAMS]

# The kernel works in row blocks of 256 anchors and column tiles of 512 contrast rows:
# these shapes have several of each, with a partial last block and tile.
LARGE = [
    Case("v2_multi_tile", b=389, v=2, d=13, labels=tuple(i % 23 for i in range(389))),
    Case("v1_ref_multi_tile", b=301, v=None, d=6, labels=tuple(i % 7 for i in range(301)), n_ref=290,
         ref_labels=tuple(i % 11 for i in range(290))),
    Case("v3_one_mode_multi_block", b=263, v=3, d=5, labels=tuple(i % 17 for i in range(263)),
         contrast_mode="one"),
]
LARGE_PARAMS = [(k, c) for k in LOSSES for c in LARGE if c.contrast_mode == "all" or k == "supcon"]
LARGE_IDS = [f"{k}-{c.name}" for k, c in LARGE_PARAMS]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_matches_reference_float64(kind, case, reduction):
    assert_matches_reference(kind, case, backend="native", reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_matches_reference_training_dtypes(kind, case, dtype):
    assert_matches_reference(kind, case, backend="native", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,case", LARGE_PARAMS, ids=LARGE_IDS)
def test_matches_reference_several_blocks(kind, case, dtype):
    assert_matches_reference(kind, case, backend="native", dtype=dtype, reduction="mean")
    assert_matches_reference(kind, case, backend="native", dtype=dtype, reduction="none")


def _gradcheck_inputs(with_ref):
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(7, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    if not with_ref:
        return feats, labels, None, None
    ref = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    return feats, labels, ref, torch.tensor([0, 2, 2, 4, 1, 0])


@pytest.mark.parametrize("with_ref", [False, True], ids=["no_ref", "ref"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", LOSSES)
def test_gradcheck_float64(kind, reduction, with_ref):
    fn, kwargs = loss_fn(kind)
    feats, labels, ref, ref_labels = _gradcheck_inputs(with_ref)
    inputs = (feats,) if ref is None else (feats, ref)

    def loss(x, r=None):
        return fn(x, labels, reduction=reduction, backend="native", ref_features=r, ref_labels=ref_labels, **kwargs)

    assert torch.autograd.gradcheck(loss, inputs)


def _loss_and_grads(kind, case, threads):
    fn, kwargs = loss_fn(kind)
    feats, labels, ref, ref_labels = make_inputs(case, dtype=torch.float32, seed=3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = feats.clone().requires_grad_(True)
        r = None if ref is None else ref.clone().requires_grad_(True)
        loss = fn(x, labels, backend="native", ref_features=r, ref_labels=ref_labels, **kwargs)
        loss.backward()
    finally:
        torch.set_num_threads(old)
    return [loss.detach(), x.grad] + ([] if r is None else [r.grad])


THREAD_CASES = [
    # symmetric path: 3 x 3 upper-triangular tiles of 256, in several groups
    Case("symmetric", b=330, v=2, d=24, labels=tuple(i % 37 for i in range(330))),
    # general path: 3 row blocks of 256 anchors, 3 column tiles of 512 (ref rows included)
    Case("with_ref", b=300, v=2, d=24, labels=tuple(i % 37 for i in range(300)), n_ref=500,
         ref_labels=tuple(i % 41 for i in range(500))),
]


@pytest.mark.parametrize("case", THREAD_CASES, ids=[c.name for c in THREAD_CASES])
@pytest.mark.parametrize("kind", LOSSES)
def test_results_do_not_depend_on_thread_count(kind, case):
    one = _loss_and_grads(kind, case, threads=1)
    two = _loss_and_grads(kind, case, threads=2)
    for name, a, b in zip(["loss", "features grad", "ref grad"], one, two):
        assert torch.equal(a, b), f"{name} differs by up to {(a - b).abs().max().item()}"


def test_auto_picks_native_on_cpu():
    assert backends.auto(torch.device("cpu")).name == "native"


def test_no_valid_anchor_gives_zero_loss_and_gradient():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loss = FC.supcon_loss(x, torch.arange(5), backend="native")  # every anchor lacks a positive
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
