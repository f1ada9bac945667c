"""Faulty input and unusual contexts: non-finite values, autocast, hyper-parameter types,
label and argument errors, and the warning of a "mean" loss without a valid anchor.

Every CPU backend must give the reference's result, or the same clear error."""

import fractions
import math
import warnings

import numpy as np
import pytest
import torch

import fastcon
import fastcon.functional as FC
import fastcon.native

CPU_BACKENDS = ["reference", "blockwise"] + (["native"] if fastcon.native.is_available() else [])
LOSS_FNS = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}


# --- non-finite input -----------------------------------------------------------------------


def _poisoned(where: str, value: float):
    """A batch with one non-finite entry: in a bank row that is a negative of every anchor,
    in a bank row that is some anchors' positive, or in a batch row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 8, generator=g)
    y = torch.tensor([0, 1, 0, 2, 1, 2])
    ref = torch.randn(5, 8, generator=g)
    ref_y = torch.tensor([0, 1, 9, 2, 0])  # row 2: a class no anchor has
    if where == "bank_negative":
        ref[2, 3] = value
    elif where == "bank_positive":
        ref[3, 3] = value
    else:
        x[1, 0, 2] = value
    return x, y, ref, ref_y


@pytest.mark.parametrize("kind", sorted(LOSS_FNS))
@pytest.mark.parametrize("where", ["bank_negative", "bank_positive", "features"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_input_gives_the_reference_result_on_every_backend(kind, where, value):
    x, y, ref, ref_y = _poisoned(where, value)
    for reduction in ["mean", "none"]:
        want = LOSS_FNS[kind](x, y, ref_features=ref, ref_labels=ref_y, reduction=reduction, backend="reference")
        assert not torch.isfinite(want).all()
        for backend in CPU_BACKENDS[1:]:
            got = LOSS_FNS[kind](x, y, ref_features=ref, ref_labels=ref_y, reduction=reduction, backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m: f"{backend} {reduction}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSS_FNS))
def test_anchor_without_contrast_rows_is_exactly_zero(backend, kind):
    # one row: A(i) is empty (its log-sum-exp is -inf), the anchor is invalid, the loss 0
    x = torch.randn(1, 4, requires_grad=True)
    for reduction in ["mean", "sum", "none"]:
        loss = LOSS_FNS[kind](x, torch.tensor([2]), reduction=reduction, backend=backend)
        assert torch.equal(loss.detach(), torch.zeros_like(loss)), (reduction, loss)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.equal(grad, torch.zeros_like(x))


# --- autocast -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSS_FNS) + ["clce"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_autocast_changes_neither_dtype_nor_value(backend, kind, reduction):
    # the loss computes in float32 and returns float32 whatever autocast the caller runs under;
    # the model's bfloat16 output goes in as it is
    torch.manual_seed(0)
    x = torch.randn(16, 2, 32).to(torch.bfloat16)
    y = torch.randint(0, 4, (16,))
    logits = torch.randn(16, 2, 5).to(torch.bfloat16)

    def loss(features):
        if kind == "clce":
            return FC.clce_loss(features, logits, y, reduction=reduction, backend=backend)
        return LOSS_FNS[kind](features, y, reduction=reduction, backend=backend)

    x_plain, x_auto = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = loss(x_plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(x_auto)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    want.sum().backward()
    got.sum().backward()  # outside autocast, as PyTorch recommends
    assert x_auto.grad.dtype == torch.bfloat16
    assert torch.equal(x_auto.grad, x_plain.grad)



@pytest.mark.parametrize("backend", CPU_BACKENDS[1:])
@pytest.mark.parametrize("kind", sorted(LOSS_FNS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fast_backends_gradient_inside_autocast_is_unchanged(backend, kind, reduction):
    # a backward inside the autocast region too (PyTorch advises against it; the reference's
    # autograd then runs its matrix products in bfloat16, the fast backends do not)
    torch.manual_seed(1)
    x = torch.randn(16, 2, 32)
    y = torch.randint(0, 4, (16,))
    x_plain, x_auto = x.clone().requires_grad_(), x.clone().requires_grad_()
    LOSS_FNS[kind](x_plain, y, reduction=reduction, backend=backend).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        LOSS_FNS[kind](x_auto, y, reduction=reduction, backend=backend).sum().backward()
    assert torch.equal(x_auto.grad, x_plain.grad)

# --- hyper-parameter types ------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), np.int64(1), fractions.Fraction(1, 4), 0.25])
def test_any_real_number_type_is_a_hyper_parameter(value):
    x, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    want = FC.supcon_loss(x, y, temperature=float(value))
    assert torch.equal(FC.supcon_loss(x, y, temperature=value), want)
    assert fastcon.SupConLoss(temperature=value).temperature == float(value)
    assert type(fastcon.SupConLoss(temperature=value).temperature) is float
    assert fastcon.CLCELoss(alpha=np.float32(0.5)).alpha == 0.5


@pytest.mark.parametrize("value", [torch.tensor(0.1), True, np.bool_(True), "0.1", None])
def test_non_real_hyper_parameters_are_refused(value):
    with pytest.raises(TypeError, match="temperature must be a real number"):
        FC.supcon_loss(torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1]), temperature=value)


# --- clear errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LOSS_FNS) + ["clce"])
def test_labels_on_the_meta_device_are_refused(kind):
    x, y = torch.randn(4, 2, 5), torch.tensor([0, 1, 0, 2], device="meta")
    with pytest.raises(ValueError, match="labels is on the meta device"):
        if kind == "clce":
            FC.clce_loss(x, torch.randn(4, 3), y)
        else:
            LOSS_FNS[kind](x, y)
    with pytest.raises(ValueError, match="ref_labels is on the meta device"):
        FC.supcon_loss(x, torch.tensor([0, 1, 0, 2]), ref_features=torch.randn(3, 5),
                       ref_labels=torch.zeros(3, dtype=torch.long, device="meta"))


def test_clce_zero_dim_features_are_refused():
    with pytest.raises(ValueError, match=r"features must be \[B, V, D\] or \[N, D\], got 0-D"):
        FC.clce_loss(torch.tensor(1.0), torch.randn(4, 3), torch.tensor([0, 1, 1, 2]))


@pytest.mark.parametrize("bad", [3, 10, -1, -100])  # -100: cross-entropy's default ignore_index
def test_clce_labels_outside_the_classes_are_refused(bad):
    x, logits = torch.randn(4, 2, 5), torch.randn(4, 3)
    y = torch.tensor([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, 3\) .* got {bad}"):
        FC.clce_loss(x, logits, y)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        fastcon.CLCELoss()(x, logits, y.tolist())


# --- the warning of a "mean" loss without a valid anchor ------------------------------------


@pytest.fixture
def warn_again(monkeypatch):
    """As in a fresh process: the warning has not been shown yet."""
    monkeypatch.setattr(FC, "_WARNED_NO_VALID_ANCHOR", False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSS_FNS) + ["clce"])
def test_mean_without_a_valid_anchor_warns_once_per_process(warn_again, backend, kind):
    x = torch.randn(5, 4)
    y = torch.arange(5)  # one view per sample, every label distinct

    def loss(**kw):
        if kind == "clce":
            return FC.clce_loss(x, torch.randn(5, 6), y, backend=backend, **kw)
        return LOSS_FNS[kind](x, y, backend=backend, **kw)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(reduction="sum")
        loss(reduction="none")
        assert not caught  # only "mean" hides the problem behind a plausible 0.0
        loss()
        loss()
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].category is UserWarning
    assert "one view per sample and all-distinct labels" in str(caught[0].message)
    assert caught[0].filename == __file__  # it names the caller's line


def test_warning_only_without_a_valid_anchor_and_through_modules(warn_again):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FC.supcon_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 2]))
        fastcon.SupConLoss()(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    assert len(caught) == 1 and caught[0].filename == __file__  # through nn.Module too
