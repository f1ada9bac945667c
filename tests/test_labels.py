"""Labels are compared, never used in arithmetic: any int64 value is a label, and unlabelled
memory-bank rows are negatives of every anchor whatever the labels are."""

import pytest
import torch

import fastcon.functional as FC
import fastcon.native

BACKENDS = ["reference", "blockwise"] + (["native"] if fastcon.native.is_available() else [])
MAX, MIN = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_fn", [FC.supcon_loss, FC.schane_loss, FC.focal_supcon_loss],
                         ids=["supcon", "schane", "focal"])
@pytest.mark.parametrize("bank", ["unlabelled", "labelled"])
def test_extreme_labels_are_plain_labels(backend, loss_fn, bank):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    ref = torch.randn(5, 8, dtype=torch.float64)
    extreme, plain = torch.tensor([MAX, MIN, MAX, MIN]), torch.tensor([1, 0, 1, 0])
    ref_labels = {"unlabelled": (None, None),
                  "labelled": (torch.tensor([MAX, MIN, 7, MAX, 3]), torch.tensor([1, 0, 7, 1, 3]))}[bank]
    out = []
    for labels, ref_y in ((extreme, ref_labels[0]), (plain, ref_labels[1])):
        f = x.clone().requires_grad_(True)
        loss = loss_fn(f, labels, ref_features=ref, ref_labels=ref_y, backend=backend, reduction="none")
        loss.sum().backward()
        out.append((loss.detach(), f.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlabelled_bank_rows_are_never_positives(backend):
    """With the largest label in the batch, unlabelled rows used to get label max + 1, which
    wrapped to the smallest int64, a batch label: they became positives of those anchors."""
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    ref = torch.randn(3, 8, dtype=torch.float64)
    labels = torch.tensor([MAX, MIN, MAX, MIN])
    with_bank = FC.supcon_loss(x, labels, ref_features=ref, backend=backend, reduction="none")
    # the same bank rows as explicit negatives: a label no batch row has
    explicit = FC.supcon_loss(x, labels, ref_features=ref, ref_labels=torch.full((3,), 5), backend=backend,
                              reduction="none")
    torch.testing.assert_close(with_bank, explicit, rtol=1e-12, atol=1e-12)
