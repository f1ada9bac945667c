"""The Triton backend on a CUDA GPU: equivalence at realistic sizes for every dtype,
bitwise determinism, and O(N * D) extra memory. Skipped without CUDA (marker ``gpu``).

Run: ``pytest -m gpu tests/test_triton_gpu.py``
"""

import pytest
import torch

from tests.cases import LOSSES, Case, assert_matches_reference, cases_for, loss_fn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PARAMS = [(k, c) for k in LOSSES for c in cases_for(k)]
IDS = [f"{k}-{c.name}" for k, c in PARAMS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]

# Relative L2 error of the loss vector / gradient against the baseline, per input dtype.
# Half-precision tiles are rounded once more than the reference (the normalised rows and
# G go through the half dtype for the tensor-core products).
REL_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 3e-2), torch.float16: (3e-3, 1e-2)}


def _features(n, d, dtype, *, views=2, classes=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n // views, views, d, generator=g).to(device="cuda", dtype=dtype)
    labels = torch.randint(0, classes, (n // views,), generator=g).cuda()
    return feats, labels


def _loss_and_grad(kind, feats, labels, backend, reduction="mean", **extra):
    fn, kwargs = loss_fn(kind)
    x = feats.detach().clone().requires_grad_(True)
    loss = fn(x, labels, backend=backend, reduction=reduction, **kwargs, **extra)
    if reduction == "none":
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss)
        (loss * upstream).sum().backward()
    else:
        loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), x.grad


def _assert_close_rel(got, want, rel, what):
    err = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.1e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_small_cases_match_reference(kind, case, dtype):
    for reduction in ("mean", "sum", "none"):
        assert_matches_reference(kind, case, backend="triton", dtype=dtype, reduction=reduction, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", [(8192, 128), (16384, 768)])
@pytest.mark.parametrize("kind", LOSSES)
def test_realistic_sizes_match_reference(kind, n, d, dtype):
    feats, labels = _features(n, d, dtype)
    for reduction in ("mean", "none"):
        got = _loss_and_grad(kind, feats, labels, "triton", reduction)
        want = _loss_and_grad(kind, feats, labels, "reference", reduction)
        loss_tol, grad_tol = REL_TOL[dtype]
        _assert_close_rel(got[0].reshape(-1), want[0].reshape(-1), loss_tol, f"{kind} loss ({reduction})")
        _assert_close_rel(got[1], want[1], grad_tol, f"{kind} gradient ({reduction})")
        del got, want
        torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", LOSSES)
def test_largest_size_matches_blockwise(kind, dtype):
    """N = 65536: the dense reference would need tens of GB; the blockwise backend
    (itself tested against the reference) is the baseline."""
    feats, labels = _features(65536, 128, dtype)
    got = _loss_and_grad(kind, feats, labels, "triton")
    want = _loss_and_grad(kind, feats, labels, "blockwise")
    loss_tol, grad_tol = REL_TOL[dtype]
    _assert_close_rel(got[0].reshape(-1), want[0].reshape(-1), loss_tol, f"{kind} loss")
    _assert_close_rel(got[1], want[1], grad_tol, f"{kind} gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_one_mode_and_ref_rows_at_size(dtype):
    """The two-sweep backward (anchors a subset of the contrast rows) at a realistic size."""
    feats, labels = _features(8192, 128, dtype)
    ref, ref_labels = _features(4096, 128, dtype, views=1, seed=1)
    ref = ref[:, 0]
    for extra in (dict(contrast_mode="one"), dict(ref_features=ref, ref_labels=ref_labels)):
        got = _loss_and_grad("supcon", feats, labels, "triton", "none", **extra)
        want = _loss_and_grad("supcon", feats, labels, "reference", "none", **extra)
        loss_tol, grad_tol = REL_TOL[dtype]
        _assert_close_rel(got[0], want[0], loss_tol, f"loss {list(extra)}")
        _assert_close_rel(got[1], want[1], grad_tol, f"gradient {list(extra)}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", LOSSES)
def test_bitwise_deterministic(kind, dtype):
    feats, labels = _features(16384, 128, dtype)
    first = _loss_and_grad(kind, feats, labels, "triton")
    second = _loss_and_grad(kind, feats, labels, "triton")
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    case = Case("odd", b=1001, v=3, d=77, labels=tuple(i % 13 for i in range(1001)))
    assert_matches_reference(kind, case, backend="triton", dtype=dtype, device="cuda")


def _extra_peak_bytes(kind, n, d, dtype):
    feats, labels = _features(n, d, dtype)
    fn, kwargs = loss_fn(kind)
    x = feats.detach().clone().requires_grad_(True)
    fn(x, labels, backend="triton", **kwargs).backward()  # compile and autotune first
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(x, labels, backend="triton", **kwargs).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("kind", LOSSES)
def test_extra_memory_is_linear(kind):
    """fwd+bwd at N = 65536, D = 128 (bfloat16) holds a few float32 copies of the
    features at most (an N x N float32 matrix alone would be 17 GB), and doubling N
    doubles it rather than quadrupling it."""
    d = 128
    small = _extra_peak_bytes(kind, 32768, d, torch.bfloat16)
    large = _extra_peak_bytes(kind, 65536, d, torch.bfloat16)
    assert large <= 16 * 65536 * d * 4, f"{large / 2**20:.0f} MiB extra"
    assert large <= 2.6 * small, f"extra memory grew {large / small:.2f}x when N doubled"


@pytest.mark.parametrize("kind", LOSSES)
def test_fixed_configuration_without_autotuner(kind, monkeypatch):
    """FASTCON_TRITON_AUTOTUNE=0 (bitwise reproducible across processes) still matches."""
    from fastcon.backends.triton import launch

    monkeypatch.setenv("FASTCON_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(launch, "_tuned", {})
    case = Case("odd", b=1001, v=2, d=77, labels=tuple(i % 13 for i in range(1001)))
    for dtype in DTYPES:
        assert_matches_reference(kind, case, backend="triton", dtype=dtype, reduction="none", device="cuda")
    feats, labels = _features(8192, 128, torch.bfloat16)
    first = _loss_and_grad(kind, feats, labels, "triton")
    second = _loss_and_grad(kind, feats, labels, "triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
