"""Public API: modules, CLCE, docs/semantics.md edge cases, bad input, gradcheck, numerics."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastcon
import fastcon.functional as FC
from fastcon import CLCELoss, FocalSupConLoss, SCHaNeLoss, SupConLoss

import fastcon.native

FAST_BACKENDS = ["blockwise"] + (["native"] if fastcon.native.is_available() else [])
ALL_BACKENDS = ["reference"] + FAST_BACKENDS
LOSS_FNS = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}


# --- modules mirror the functional forms ---------------------------------------------


def test_modules_equal_functional():
    torch.manual_seed(0)
    x = torch.randn(10, 2, 6)
    y = torch.randint(0, 3, (10,))
    logits = torch.randn(10, 2, 4)
    assert torch.equal(SupConLoss(temperature=0.1, contrast_mode="one")(x, y),
                       FC.supcon_loss(x, y, temperature=0.1, contrast_mode="one"))
    assert torch.equal(SCHaNeLoss(beta=0.5)(x, y), FC.schane_loss(x, y, beta=0.5))
    assert torch.equal(FocalSupConLoss(gamma=2.0)(x, y), FC.focal_supcon_loss(x, y, gamma=2.0))
    assert torch.equal(CLCELoss(alpha=0.3)(x, logits, y), FC.clce_loss(x, logits, y, alpha=0.3))
    assert "temperature=0.1" in repr(SupConLoss(temperature=0.1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clce_is_alpha_mix_of_schane_and_ce(backend):
    torch.manual_seed(1)
    b, v, c = 9, 2, 5
    x = torch.randn(b, v, 7, dtype=torch.float64)
    y = torch.randint(0, c, (b,))
    logits = torch.randn(b, v, c, dtype=torch.float64)
    got = FC.clce_loss(x, logits, y, alpha=0.25, temperature=0.3, beta=0.5, backend=backend)
    schane = FC.schane_loss(x, y, temperature=0.3, beta=0.5, backend="reference")
    ce = F.cross_entropy(logits.reshape(b * v, c), y.repeat_interleave(v))
    assert got.item() == pytest.approx(0.25 * schane.item() + 0.75 * ce.item(), rel=1e-12)
    # [B, C] logits: CE over the B rows
    got2 = FC.clce_loss(x, logits[:, 0], y, alpha=0.5, backend=backend)
    want2 = 0.5 * FC.schane_loss(x, y, backend="reference") + 0.5 * F.cross_entropy(logits[:, 0], y)
    assert got2.item() == pytest.approx(want2.item(), rel=1e-12)
    # alpha = 1 is pure SCHaNe, alpha = 0 pure CE
    assert FC.clce_loss(x, logits, y, alpha=1.0).item() == pytest.approx(FC.schane_loss(x, y).item(), rel=1e-12)


def test_clce_gradients_match_reference():
    torch.manual_seed(2)
    x = torch.randn(11, 3, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (11,))
    logits = torch.randn(11, 3, 4, dtype=torch.float64)
    grads = []
    for backend in ALL_BACKENDS:
        xx, ll = x.clone().requires_grad_(), logits.clone().requires_grad_()
        FC.clce_loss(xx, ll, y, alpha=0.6, backend=backend).backward()
        grads.append((xx.grad, ll.grad))
    for g in grads[1:]:
        torch.testing.assert_close(g[0], grads[0][0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(g[1], grads[0][1], rtol=1e-12, atol=1e-12)



def _clce_dense(x, logits, y, alpha, reduction):
    """CLCE from SCHaNe's dense per-anchor losses and a per-row cross-entropy (clce_loss's docstring)."""
    schane = FC.schane_loss(x, y, temperature=0.3, beta=0.5, reduction="none", backend="reference")
    valid = FC.schane_loss(x, y, temperature=0.3, beta=0.5, reduction="sum", backend="reference") / \
        FC.schane_loss(x, y, temperature=0.3, beta=0.5, reduction="mean", backend="reference")
    if logits.dim() == 3:  # anchor v*B + b has logits[b, v]
        rows = torch.cat([logits[:, v] for v in range(logits.shape[1])])
        ce = F.cross_entropy(rows, y.repeat(logits.shape[1]), reduction="none")
    else:  # anchor v*B + b (or n) has logits[b] (or logits[n])
        views = x.shape[1] if x.dim() == 3 else 1
        ce = F.cross_entropy(logits, y, reduction="none").repeat(views)
    if reduction == "none":
        return alpha * schane + (1 - alpha) * ce
    if reduction == "sum":
        return alpha * schane.sum() + (1 - alpha) * ce.sum()
    return alpha * schane.sum() / valid + (1 - alpha) * ce.mean()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ["bvc", "bc", "nc"])
def test_clce_reductions_match_the_dense_computation(backend, reduction, shape):
    torch.manual_seed(7)
    b, v, c = 7, 3, 4
    x = torch.randn(b, v, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 3, 1, 1])  # class 2 and 3 singletons: with [N, D] some anchors are invalid
    logits = {"bvc": torch.randn(b, v, c), "bc": torch.randn(b, c), "nc": torch.randn(b, c)}[shape]
    logits = logits.to(torch.float64)
    if shape == "nc":
        x = x[:, 0]
    xx, ll = x.clone().requires_grad_(), logits.clone().requires_grad_()
    got = FC.clce_loss(xx, ll, y, alpha=0.3, temperature=0.3, beta=0.5, reduction=reduction, backend=backend)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    want = _clce_dense(xr, lr, y, 0.3, reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    upstream = torch.rand(want.shape, dtype=torch.float64)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(xx.grad, xr.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ll.grad, lr.grad, rtol=1e-10, atol=1e-12)
    module = CLCELoss(alpha=0.3, temperature=0.3, beta=0.5, reduction=reduction, backend=backend)
    assert torch.equal(module(x, logits, y), got.detach())
    assert "reduction=" + repr(reduction) in repr(module)


def test_clce_reduction_is_checked():
    _err(ValueError, "reduction must be one of", FC.clce_loss, torch.randn(4, 2, 3), torch.randn(4, 3),
         torch.tensor([0, 1, 0, 1]), reduction="avg")
    _err(ValueError, "reduction must be one of", CLCELoss, reduction="avg")


# --- docs/semantics.md edge cases ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["supcon", "schane", "focal"])
def test_no_valid_anchor_gives_zero_loss_and_zero_connected_gradient(backend, kind):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.arange(5)  # every class a singleton: no anchor has a positive
    for reduction in ["mean", "sum"]:
        loss = LOSS_FNS[kind](x, y, backend=backend, reduction=reduction)
        assert loss.item() == 0.0
        assert loss.requires_grad
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))
    per_anchor = LOSS_FNS[kind](x, y, backend=backend, reduction="none")
    assert torch.equal(per_anchor, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_class_schane_has_no_valid_anchor_but_supcon_does(backend):
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(4, dtype=torch.long)
    assert FC.schane_loss(x, y, backend=backend).item() == 0.0  # no negatives
    supcon = FC.supcon_loss(x, y, backend=backend)
    assert supcon.item() != 0.0 and math.isfinite(supcon.item())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_two_rows(backend):
    # N = 2, same label: each anchor's only contrast row is its positive, so SupCon's
    # log-probability is 0 and the loss is exactly 0 with a zero gradient.
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    loss = FC.supcon_loss(x, torch.tensor([3, 3]), backend=backend)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    loss.backward()
    assert x.grad.abs().max().item() < 1e-12


def test_instance_discrimination_equals_explicit_sample_labels():
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    for backend in ALL_BACKENDS:
        assert FC.supcon_loss(x, backend=backend).item() == pytest.approx(
            FC.supcon_loss(x, torch.arange(6), backend=backend).item(), rel=1e-12)


def test_view_major_flattening():
    # [B, V, D] must equal the [V*B, D] input with view-major rows and repeated labels
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1])
    flat = torch.cat(torch.unbind(x, dim=1), dim=0)
    for kind, fn in LOSS_FNS.items():
        a = fn(x, y, reduction="none", backend="reference")
        b = fn(flat, y.repeat(3), reduction="none", backend="reference")
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_normalize_is_idempotent_and_can_be_disabled():
    x = F.normalize(torch.randn(8, 2, 5, dtype=torch.float64), dim=-1)
    y = torch.randint(0, 3, (8,))
    for backend in ALL_BACKENDS:
        a = FC.supcon_loss(x, y, backend=backend)
        b = FC.supcon_loss(x, y, normalize=False, backend=backend)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
        c = FC.supcon_loss(3 * x, y, normalize=False, backend=backend)  # unnormalised: sharper logits
        assert c.item() != pytest.approx(a.item(), rel=1e-3)


def test_unlabelled_ref_rows_are_negatives_of_every_anchor():
    torch.manual_seed(3)
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = torch.randn(5, 4, dtype=torch.float64)
    for backend in ALL_BACKENDS:
        a = FC.supcon_loss(x, y, ref_features=ref, backend=backend)
        b = FC.supcon_loss(x, y, ref_features=ref, ref_labels=torch.full((5,), 99), backend=backend)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)


# --- dtypes and numerics ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_and_gradient_dtypes(backend, dtype):
    x = torch.randn(6, 2, 8).to(dtype).requires_grad_()
    loss = FC.supcon_loss(x, torch.tensor([0, 1, 0, 1, 2, 2]), backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["supcon", "schane", "focal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_temperature_half_precision_is_finite(backend, kind, dtype):
    torch.manual_seed(4)
    # near-duplicate rows make s_ij close to 1/t = 100 for some pairs and far below for others
    base = torch.randn(4, 16)
    x = (base.repeat(8, 1) + 0.01 * torch.randn(32, 16)).reshape(16, 2, 16).to(dtype).requires_grad_()
    y = torch.arange(16) % 4
    loss = LOSS_FNS[kind](x, y, temperature=0.01, backend=backend)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("kind", ["supcon", "schane", "focal"])
def test_low_temperature_fast_path_matches_reference_float64(kind):
    torch.manual_seed(5)
    x = torch.randn(12, 2, 6, dtype=torch.float64)
    y = torch.arange(12) % 3
    out = []
    for backend in ALL_BACKENDS:
        xx = x.clone().requires_grad_()
        loss = LOSS_FNS[kind](xx, y, temperature=0.01, backend=backend)
        loss.backward()
        out.append((loss.detach(), xx.grad))
    for o in out[1:]:
        torch.testing.assert_close(o[0], out[0][0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(o[1], out[0][1], rtol=1e-7, atol=1e-9)


# --- gradcheck (float64) ----------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kind,kw", [
    ("supcon", dict(temperature=0.3)),
    ("supcon", dict(temperature=0.3, contrast_mode="one")),
    ("schane", dict(temperature=0.4, beta=0.8)),
    ("focal", dict(temperature=0.3, gamma=1.5)),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, kind, kw, reduction):
    torch.manual_seed(6)
    x = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    ref_y = torch.tensor([0, 1, 5, 2, 0])

    def f(a, r):
        out = LOSS_FNS[kind](a, y, ref_features=r, ref_labels=ref_y, reduction=reduction, backend=backend, **kw)
        return out

    with fastcon.block_memory(500):  # several blocks
        assert torch.autograd.gradcheck(f, (x, ref), eps=1e-6, atol=1e-6, rtol=1e-5)


# --- bad input ----------------------------------------------------------------------------


def _err(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_features():
    y = torch.tensor([0, 1])
    _err(ValueError, r"features must be \[B, V, D\] or \[N, D\]", FC.supcon_loss, torch.randn(2), y)
    _err(ValueError, r"features must be \[B, V, D\] or \[N, D\]", FC.supcon_loss, torch.randn(2, 2, 2, 2), y)
    _err(TypeError, "features must be float16, bfloat16, float32 or float64", FC.supcon_loss,
         torch.ones(2, 3, dtype=torch.long), y)
    _err(TypeError, "features must be a torch.Tensor", FC.supcon_loss, [[1.0, 2.0]], y)
    _err(ValueError, "non-zero sizes", FC.supcon_loss, torch.randn(0, 2, 3))


def test_bad_labels():
    x3, x2 = torch.randn(4, 2, 3), torch.randn(4, 3)
    _err(ValueError, "labels has 3 entries but the batch size B", FC.supcon_loss, x3, torch.tensor([0, 1, 2]))
    _err(ValueError, "labels has 5 entries but the number of rows N", FC.schane_loss, x2, torch.arange(5))
    _err(TypeError, "labels must hold integers", FC.supcon_loss, x3, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    _err(TypeError, "labels must hold integers", FC.supcon_loss, x3, torch.tensor([True, False, True, True]))
    _err(ValueError, "labels must be 1-D", FC.supcon_loss, x3, torch.zeros(4, 1, dtype=torch.long))
    _err(ValueError, r"labels is required when features is \[N, D\]", FC.focal_supcon_loss, x2)


def test_bad_options():
    x, y = torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1])
    _err(ValueError, "contrast_mode must be one of 'all', 'one', got 'both'", FC.supcon_loss, x, y,
         contrast_mode="both")
    _err(ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'", FC.supcon_loss, x, y,
         reduction="avg")
    _err(ValueError, "backend must be one of", FC.supcon_loss, x, y, backend="cuda")
    for t in [0.0, -0.1, float("nan"), float("inf")]:
        _err(ValueError, "temperature must be a finite number > 0", FC.supcon_loss, x, y, temperature=t)
        _err(ValueError, "temperature must be a finite number > 0", SCHaNeLoss, temperature=t)
    _err(ValueError, "base_temperature must be a finite number > 0", SupConLoss, base_temperature=0)
    _err(ValueError, "gamma must be >= 0", FocalSupConLoss, gamma=-1)
    _err(ValueError, "beta must be finite", FC.schane_loss, x, y, beta=float("nan"))
    for a in [-0.1, 1.5]:
        _err(ValueError, r"alpha must lie in \[0, 1\]", CLCELoss, alpha=a)
        _err(ValueError, r"alpha must lie in \[0, 1\]", FC.clce_loss, x, torch.randn(4, 3), y, alpha=a)
    _err(ValueError, "contrast_mode must be one of", SupConLoss, contrast_mode="none")
    _err(ValueError, "reduction must be one of", SCHaNeLoss, reduction="max")


def test_bad_ref_and_logits():
    x, y = torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1])
    _err(ValueError, "ref_features has feature size 5 but features has 3", FC.supcon_loss, x, y,
         ref_features=torch.randn(6, 5), ref_labels=torch.arange(6))
    _err(ValueError, "ref_labels has 4 entries but the number of rows of ref_features is 6", FC.supcon_loss,
         x, y, ref_features=torch.randn(6, 3), ref_labels=torch.arange(4))
    _err(ValueError, "ref_labels was given without ref_features", FC.supcon_loss, x, y, ref_labels=torch.arange(4))
    _err(ValueError, r"logits \[B, V, C\] must match features", FC.clce_loss, x, torch.randn(4, 3, 5), y)
    _err(ValueError, r"logits \[B, C\] must have B = 4 rows", FC.clce_loss, x, torch.randn(5, 5), y)
    _err(ValueError, r"logits must be \[N, C\] with N = 4", FC.clce_loss, torch.randn(4, 3), torch.randn(3, 5), y)
    _err(TypeError, "logits must be a floating-point tensor", FC.clce_loss, x, torch.ones(4, 5, dtype=torch.long), y)
    _err(ValueError, "labels is required by clce_loss", FC.clce_loss, x, torch.randn(4, 5), None)


def test_bad_input_is_rejected_before_heavy_work(monkeypatch):
    # the similarity sweep must never start on invalid input
    import fastcon.backends.blockwise as bw

    def boom(*a, **k):
        raise AssertionError("sweep started before validation")

    monkeypatch.setattr(bw, "_blocks", boom)
    with pytest.raises(ValueError):
        FC.supcon_loss(torch.randn(4, 2, 3), torch.arange(3), backend="blockwise")


def test_unavailable_backends_say_why(monkeypatch):
    import fastcon.backends.native as native_backend

    x, y = torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1])
    # as on a machine without the compiled kernel
    monkeypatch.setattr(native_backend, "is_available", lambda: False)
    monkeypatch.setattr(native_backend, "import_error", lambda: "no compiled library at /nowhere")
    _err(RuntimeError, "backend='native' is not available: the compiled CPU kernel is not loaded: no compiled "
         "library at /nowhere", FC.supcon_loss, x, y, backend="native")
    assert fastcon.backends.auto(torch.device("cpu")).name == "blockwise"
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        _err(RuntimeError, "backend='triton'", FC.supcon_loss, x, y, backend="triton")


def test_block_memory_setting():
    old = fastcon.get_block_memory()
    with fastcon.block_memory(1234):
        assert fastcon.get_block_memory() == 1234
    assert fastcon.get_block_memory() == old
    _err(ValueError, "nbytes must be a positive int", fastcon.set_block_memory, 0)
