"""The Triton backend on a CUDA GPU: equivalence at realistic sizes for every dtype,
forward + backward inside a CUDA graph and under ``torch.compile``, bitwise determinism,
and O(N * D) extra memory. Skipped without CUDA (marker ``gpu``).

Run: ``pytest -m gpu tests/test_triton_gpu.py`` (the CUDA graph and ``torch.compile`` tests
come first, so that a run stopped by a time limit has them).
"""

import pytest
import torch

from tests.cases import LOSSES, Case, cases_for, loss_fn, make_inputs, run_loss

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
# G go through the half dtype for the tensor-core products). A gradient off by 10% fails.
REL_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 3e-2), torch.float16: (3e-3, 1e-2)}
# An absolute floor per element, for the cases whose exact loss and gradient are zero (two
# rows of one class; SCHaNe with one class): sqrt(numel) * ABS_TOL is added to the bound.
ABS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 3e-4}


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


def _assert_close_rel(got, want, rel, what, abs_tol=0.0):
    """``||got - want|| <= rel * ||want|| + abs_tol * sqrt(numel)`` (L2 norms, in float64)."""
    diff, norm = (got.double() - want.double()).norm(), want.double().norm()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    bound = rel * norm + abs_tol * want.numel() ** 0.5
    assert diff <= bound, (f"{what}: ||got - want|| = {diff:.3e} > {bound:.3e} (relative error "
                           f"{diff / norm.clamp(min=1e-30):.3e}, tolerance {rel:.1e} relative + {abs_tol:.0e})")


def assert_matches_exact(got, want, dtype, what=""):
    """``got = (loss, features grad, ref grad or None)`` of a backend on ``dtype`` inputs against
    ``want``, the reference's on the float64 copies of those same inputs: norm-relative errors
    within ``REL_TOL`` (one element may be off by more than an elementwise tolerance; a wrong
    coefficient moves the whole vector)."""
    loss_tol, grad_tol = REL_TOL[dtype]
    assert got[1].dtype == dtype, f"{what} gradient dtype {got[1].dtype}, expected {dtype}"
    _assert_close_rel(got[0].reshape(-1), want[0].reshape(-1), loss_tol, f"{what} loss", ABS_TOL[dtype])
    _assert_close_rel(got[1], want[1], grad_tol, f"{what} features gradient", ABS_TOL[dtype])
    if want[2] is not None:
        _assert_close_rel(got[2], want[2], grad_tol, f"{what} ref_features gradient", ABS_TOL[dtype])


def exact_reference(kind, case, feats, labels, ref, ref_labels, reduction):
    """The dense reference on float64 copies of the (rounded) inputs."""
    wide = [None if t is None else t.double() for t in (feats, ref)]
    return run_loss(kind, case, wide[0], labels, wide[1], ref_labels, backend="reference", reduction=reduction)


def assert_triton_matches_exact(kind, case, dtype, reductions=("mean", "sum", "none")):
    feats, labels, ref, ref_labels = make_inputs(case, dtype=dtype, device="cuda")
    for reduction in reductions:
        got = run_loss(kind, case, feats, labels, ref, ref_labels, backend="triton", reduction=reduction)
        want = exact_reference(kind, case, feats, labels, ref, ref_labels, reduction)
        assert_matches_exact(got, want, dtype, f"{reduction}:")


# --- a training step inside a CUDA graph, and under torch.compile --------------------------------

def _step_fn(kind):
    fn, kwargs = loss_fn(kind)

    def step(x, labels):
        return fn(x, labels, backend="triton", **kwargs)

    return step


@pytest.mark.parametrize("kind", LOSSES)
def test_cuda_graph_replay_matches_eager(kind):
    """Forward + backward captured once in a CUDA graph (no host sync may happen inside it, and
    nothing may be allocated by a size read from the data), then replayed on new features and
    new labels copied into the static inputs, gives the eager result for those inputs. (bfloat16:
    the host path is the same for every dtype, and float32 kernels take long to compile.)"""
    n, d, dtype = 1000, 96, torch.bfloat16  # a partial last tile and padded D
    step = _step_fn(kind)
    feats, labels = _features(n, d, dtype, classes=37)
    x = feats.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        for _ in range(3):
            x.grad = None
            step(x, labels).backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(x, labels)
        static_loss.backward()
    for seed in (1, 2):
        new_feats, new_labels = _features(n, d, dtype, classes=5 + 40 * seed, seed=seed)
        with torch.no_grad():
            x.copy_(new_feats)
        labels.copy_(new_labels)
        graph.replay()
        torch.cuda.synchronize()
        want = _loss_and_grad(kind, new_feats, new_labels, "triton")
        want_ref = _loss_and_grad(kind, new_feats, new_labels, "reference")
        assert torch.equal(static_loss, want[0]), f"replay {seed}: loss {static_loss} != eager {want[0]}"
        assert torch.equal(x.grad, want[1]), f"replay {seed}: gradient differs from the eager call"
        _assert_close_rel(x.grad, want_ref[1], REL_TOL[dtype][1], f"replay {seed}: gradient vs reference")


@pytest.mark.parametrize("kind", LOSSES)
def test_no_host_sync_after_warmup(kind):
    """Once compiled and autotuned, a forward + backward makes no synchronising CUDA call."""
    step = _step_fn(kind)
    feats, labels = _features(4096, 128, torch.bfloat16)
    x = feats.clone().requires_grad_(True)
    step(x, labels).backward()
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x, labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("kind", LOSSES)
def test_torch_compile_matches_eager(kind, mode):
    """A function that calls the loss, under ``torch.compile(mode=...)``: loss and gradient of
    the eager call, over calls on new inputs (``reduce-overhead`` records a CUDA graph at the
    third call and replays it after)."""
    import torch._dynamo

    torch._dynamo.reset()
    dtype = torch.bfloat16
    eager = _step_fn(kind)

    def train_step(x, labels):
        return eager(x * 1.0, labels)  # the loss inside a larger compiled function

    compiled = torch.compile(train_step, mode=mode)
    for seed in range(4):
        feats, labels = _features(2048, 128, dtype, seed=seed)
        x = feats.clone().requires_grad_(True)
        loss = compiled(x, labels)
        loss.backward()
        got = (loss.detach().clone(), x.grad.clone())
        want = _loss_and_grad(kind, feats, labels, "triton")
        loss_tol, grad_tol = REL_TOL[dtype]
        _assert_close_rel(got[0].reshape(-1), want[0].reshape(-1), loss_tol, f"call {seed}: loss")
        _assert_close_rel(got[1], want[1], grad_tol, f"call {seed}: gradient")


# --- equivalence with the dense reference ----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_small_cases_match_reference(kind, case, dtype):
    assert_triton_matches_exact(kind, case, dtype)


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
    assert_triton_matches_exact(kind, case, dtype, ("mean",))


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
        assert_triton_matches_exact(kind, case, dtype, ("none",))
    feats, labels = _features(8192, 128, torch.bfloat16)
    first = _loss_and_grad(kind, feats, labels, "triton")
    second = _loss_and_grad(kind, feats, labels, "triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
