"""The blockwise backend against the dense reference: loss and gradients, odd shapes, every
reduction, every dtype users train in, and float64 gradcheck."""

import pytest
import torch

import fastcon
from tests.cases import LOSSES, TOLERANCES, assert_matches_reference, cases_for, loss_fn, make_inputs

PARAMS = [(k, c) for k in LOSSES for c in cases_for(k)]
IDS = [f"{k}-{c.name}" for k, c in PARAMS]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_matches_reference_float64(kind, case, reduction):
    assert_matches_reference(kind, case, backend="blockwise", reduction=reduction)


@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_matches_reference_small_blocks(kind, case):
    # a budget of a few hundred bytes forces one or two anchor rows per block, so the
    # number of anchors is never a multiple of the block
    with fastcon.block_memory(300):
        assert_matches_reference(kind, case, backend="blockwise", reduction="mean")
        assert_matches_reference(kind, case, backend="blockwise", reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_matches_reference_training_dtypes(kind, case, dtype):
    assert_matches_reference(kind, case, backend="blockwise", dtype=dtype)
