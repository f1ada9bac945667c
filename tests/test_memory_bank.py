"""MemoryBank: FIFO order, capacity, labels, detaching, and that a loss fed from it equals the
loss given the same rows as ref_features (multi-process pushes are in test_distributed.py)."""

import pytest
import torch

import fastcon
import fastcon.functional as FC


def rows(start, n, dim=3):
    return torch.arange(start * dim, (start + n) * dim, dtype=torch.float32).reshape(n, dim)


def test_empty_bank_gives_no_ref():
    bank = fastcon.MemoryBank(capacity=4, dim=3)
    assert len(bank) == 0
    assert bank.ref_kwargs() == {"ref_features": None, "ref_labels": None}


def test_fifo_keeps_the_newest_capacity_rows():
    bank = fastcon.MemoryBank(capacity=5, dim=3)
    bank.push(rows(0, 3), torch.tensor([0, 1, 2]))
    bank.push(rows(3, 4), torch.tensor([3, 4, 5, 6]))  # wraps: rows 0 and 1 are dropped
    assert len(bank) == 5
    kept = sorted(bank.labels.tolist())
    assert kept == [2, 3, 4, 5, 6]
    for row, label in zip(bank.features, bank.labels):
        torch.testing.assert_close(row, rows(int(label), 1)[0])


def test_push_larger_than_capacity_keeps_the_last_rows():
    bank = fastcon.MemoryBank(capacity=4, dim=3)
    bank.push(rows(0, 2), torch.tensor([0, 1]))
    bank.push(rows(2, 7), torch.arange(2, 9))
    assert sorted(bank.labels.tolist()) == [5, 6, 7, 8]


def test_views_are_flattened_view_major_with_repeated_labels():
    bank = fastcon.MemoryBank(capacity=10, dim=2)
    feats = torch.randn(3, 2, 2)
    bank.push(feats, torch.tensor([7, 8, 9]))
    torch.testing.assert_close(bank.features, feats.transpose(0, 1).reshape(6, 2))
    assert bank.labels.tolist() == [7, 8, 9, 7, 8, 9]


def test_rows_are_detached_copies_in_the_bank_dtype():
    bank = fastcon.MemoryBank(capacity=4, dim=3, dtype=torch.float64)
    x = torch.randn(2, 3, requires_grad=True)
    bank.push(x, torch.tensor([0, 1]))
    assert not bank.features.requires_grad
    assert bank.features.dtype == torch.float64
    with torch.no_grad():
        x.add_(1.0)
    assert not torch.equal(bank.features, x.detach().double())


def test_unlabelled_bank_and_mixing_is_refused():
    bank = fastcon.MemoryBank(capacity=4, dim=3)
    bank.push(torch.randn(2, 2, 3))  # [B, V, D] without labels: MoCo keys
    assert len(bank) == 4 and bank.labels is None
    with pytest.raises(ValueError, match="unlabelled"):
        bank.push(torch.randn(1, 3), torch.tensor([0]))
    labelled = fastcon.MemoryBank(capacity=4, dim=3)
    labelled.push(torch.randn(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="pass labels"):
        labelled.push(torch.randn(1, 3))


def test_wrong_feature_size_is_refused():
    bank = fastcon.MemoryBank(capacity=4, dim=3)
    with pytest.raises(ValueError, match="size 3"):
        bank.push(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="capacity"):
        fastcon.MemoryBank(capacity=0, dim=3)


def test_state_dict_round_trip_and_reset():
    bank = fastcon.MemoryBank(capacity=4, dim=3)
    bank.push(rows(0, 3), torch.tensor([0, 1, 2]))
    copy = fastcon.MemoryBank(capacity=4, dim=3)
    copy.load_state_dict(bank.state_dict())
    assert len(copy) == 3 and torch.equal(copy.features, bank.features) and torch.equal(copy.labels, bank.labels)
    copy.push(rows(3, 2), torch.tensor([3, 4]))
    assert sorted(copy.labels.tolist()) == [1, 2, 3, 4]
    copy.reset()
    assert len(copy) == 0 and copy.features is None


@pytest.mark.parametrize("labelled", [True, False])
def test_loss_from_bank_equals_loss_with_ref_features(labelled):
    g = torch.Generator().manual_seed(0)
    bank = fastcon.MemoryBank(capacity=16, dim=5, dtype=torch.float64)
    old = torch.randn(6, 2, 5, generator=g, dtype=torch.float64)
    old_labels = torch.randint(0, 3, (6,), generator=g)
    bank.push(old, old_labels if labelled else None)
    x = torch.randn(4, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (4,), generator=g) if labelled else None
    got = FC.supcon_loss(x, y, **bank.ref_kwargs())
    ref = old.transpose(0, 1).reshape(12, 5)
    want = FC.supcon_loss(x, y, ref_features=ref, ref_labels=old_labels.repeat(2) if labelled else None,
                          backend="reference")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("key,value,match", [
    ("size", 10, r"size must lie in \[0, capacity = 4\], got 10"),
    ("size", -1, r"size must lie in \[0, capacity = 4\], got -1"),
    ("write_index", 4, r"write_index must lie in \[0, capacity = 4\), got 4"),
    ("labelled", 2, "labelled must be -1, 0 or 1, got 2"),
])
def test_state_dict_that_no_bank_of_this_capacity_holds_is_refused_at_load(key, value, match):
    bank = fastcon.MemoryBank(capacity=4, dim=3)
    bank.push(rows(0, 2), torch.tensor([0, 1]))
    state = bank.state_dict()
    state[key] = torch.tensor(value)
    fresh = fastcon.MemoryBank(capacity=4, dim=3)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert len(fresh) == 0  # nothing was loaded


def test_state_dict_round_trip_of_a_full_bank():
    bank = fastcon.MemoryBank(capacity=4, dim=3)
    bank.push(rows(0, 6), torch.arange(6))  # wrapped: size 4, write_index 2
    fresh = fastcon.MemoryBank(capacity=4, dim=3)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.features, bank.features) and torch.equal(fresh.labels, bank.labels)
    fresh.push(rows(6, 1), torch.tensor([6]))
    assert sorted(fresh.labels.tolist()) == [3, 4, 5, 6]
