"""The Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, against the dense reference.

Not collected by a plain ``pytest`` run (the file name does not start with ``test_``):
``tests/test_triton_interpret.py`` runs it in a subprocess with the interpreter switched
on and a 16-wide tile, so the variable cannot leak into other tests and N, D are never
multiples of the tile.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

import fastcon.functional as FC  # noqa: E402
from fastcon.backends.triton import engine as triton_engine  # noqa: E402
from fastcon.backends.triton import launch, sides  # noqa: E402
from fastcon.losses import FocalSupCon, SCHaNe, SupCon  # noqa: E402
from tests.cases import LOSSES, Case, assert_matches_reference, cases_for, make_inputs, run_loss  # noqa: E402

PARAMS = [(k, c) for k in LOSSES for c in cases_for(k)]
IDS = [f"{k}-{c.name}" for k, c in PARAMS]

# Several tiles in every direction (rows, columns, D chunks, output D chunks) with a
# 16-wide tile: N = 2 * 37 = 74 rows, D = 41.
MULTI_TILE = Case("v2_multi_tile", b=37, v=2, d=41, labels=tuple((i * 7) % 6 for i in range(37)))
MULTI_TILE_REF = Case("v2_multi_tile_ref", b=21, v=2, d=19, labels=tuple(i % 4 for i in range(21)), n_ref=23,
                      ref_labels=tuple(i % 6 for i in range(23)))


@pytest.fixture(autouse=True)
def kernels_really_run(monkeypatch):
    """Every test must launch the row-statistics kernel (float64 excepted: it runs blockwise)."""
    launches = []
    original = sides._stats_launch

    def counting(*args, **kwargs):
        launches.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sides, "_stats_launch", counting)
    yield launches


def test_interpreter_is_on():
    assert os.environ["TRITON_INTERPRET"] == "1" and launch.interpreter_enabled()
    assert launch.tile_args("stats") == {"BM": 16, "BN": 16} == launch.tile_args("grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_matches_reference_float32(kind, case, reduction, kernels_really_run):
    assert_matches_reference(kind, case, backend="triton", dtype=torch.float32, reduction=reduction)
    assert kernels_really_run


@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_two_sweep_backward(kind, case, monkeypatch):
    """The two-sweep backward (anchor blocks, then column blocks) on the cases where the
    default takes the one-sweep symmetric form, too."""
    monkeypatch.setattr(triton_engine.TritonEngine, "symmetric_sweep", False)
    assert_matches_reference(kind, case, backend="triton", dtype=torch.float32, reduction="none")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_matches_reference_half(kind, case, dtype, kernels_really_run):
    # half-precision users get half-precision tile products (float32 accumulation)
    assert_matches_reference(kind, case, backend="triton", dtype=dtype, reduction="none")
    assert kernels_really_run


@pytest.mark.parametrize("kind,case", PARAMS, ids=IDS)
def test_float64_runs_blockwise(kind, case, kernels_really_run):
    assert_matches_reference(kind, case, backend="triton", dtype=torch.float64, reduction="mean")
    assert not kernels_really_run  # float64 is documented to run on the blockwise engine


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", [MULTI_TILE, MULTI_TILE_REF], ids=lambda c: c.name)
@pytest.mark.parametrize("kind", LOSSES)
def test_multi_tile(kind, case, reduction, monkeypatch):
    assert_matches_reference(kind, case, backend="triton", dtype=torch.float32, reduction=reduction)
    if case is MULTI_TILE and reduction == "none":  # and the two-sweep backward
        monkeypatch.setattr(triton_engine.TritonEngine, "symmetric_sweep", False)
        assert_matches_reference(kind, case, backend="triton", dtype=torch.float32, reduction=reduction)


@pytest.mark.parametrize("kind,overrides", [
    ("supcon", dict(temperature=0.02)),  # low temperature: the online max must keep exp finite
    ("schane", dict(beta=0.0)),  # SCHaNe's "easy" estimator (its own constexpr branch)
    ("schane", dict(beta=3.0, temperature=0.05)),
    ("schane", dict(beta=1.0)),  # the default: one exp per element (BETA_ONE)
    ("schane", dict(beta=-0.5)),  # negative beta: the shift of beta*s is beta times the min
    ("schane", dict(beta=-1.5)),  # and so is the shift of (1+beta)*s
    ("focal", dict(gamma=0.0)),
    ("focal", dict(gamma=1.0)),  # the default (GAMMA_ONE)
    ("focal", dict(gamma=0.5)),  # (1-p)^(gamma-1) is singular at p = 1
], ids=["supcon-t0.02", "schane-beta0", "schane-beta3", "schane-beta1", "schane-beta-0.5", "schane-beta-1.5",
        "focal-gamma0", "focal-gamma1", "focal-gamma0.5"])
def test_hyper_parameters(kind, overrides):
    for reduction in ("mean", "none"):
        assert_matches_reference(kind, MULTI_TILE, backend="triton", dtype=torch.float32, reduction=reduction,
                                 **overrides)


# Many small classes (6 rows each, some straddling the 16-row blocks): a block's class range
# is two or three 16-wide tiles, so SCHaNe's unmasked plain loop (the columns outside the
# block's classes) runs on about half the tiles.
MANY_CLASSES = Case("v2_many_classes", b=45, v=2, d=23, labels=tuple((i * 7) % 15 for i in range(45)))


def _schane_plain_tiles(labels, bm=16, bn=16):
    """How many (row block, column tile) pairs SCHaNe's statistics kernel runs unmasked in the
    symmetric sweep: full tiles outside the block's class range."""
    cls = torch.sort(labels).values
    n = cls.numel()
    count = 0
    for row0 in range(0, n, bm):
        lo = int(torch.searchsorted(cls, cls[row0]))
        hi = int(torch.searchsorted(cls, cls[min(row0 + bm, n) - 1], right=True))
        count += sum(1 for t in range(n // bn) if (t + 1) * bn <= lo or t * bn >= hi)
    return count


@pytest.mark.parametrize("beta", [1.0, 0.0, 3.0, -0.5, -1.5])
def test_schane_unmasked_tiles(beta, monkeypatch):
    """SCHaNe's plain tiles hold only negatives and take no class test: every beta branch,
    both backward sweeps, and a memory bank whose classes the anchors share only in part."""
    _, labels, _, _ = make_inputs(MANY_CLASSES)
    assert _schane_plain_tiles(labels.repeat(2)) >= 10  # the case exercises the plain loop
    for reduction in ("mean", "none"):
        assert_matches_reference("schane", MANY_CLASSES, backend="triton", dtype=torch.float32,
                                 reduction=reduction, beta=beta)
    bank = Case("v2_many_classes_ref", b=30, v=2, d=23, labels=tuple((i * 7) % 9 for i in range(30)), n_ref=41,
                ref_labels=tuple(i % 12 for i in range(41)))
    assert_matches_reference("schane", bank, backend="triton", dtype=torch.float32, reduction="none", beta=beta)
    if beta == 1.0:  # the default, in the dtypes users train in (half-precision tile products)
        for dtype in (torch.bfloat16, torch.float16):
            assert_matches_reference("schane", MANY_CLASSES, backend="triton", dtype=dtype, reduction="none")
    monkeypatch.setattr(triton_engine.TritonEngine, "symmetric_sweep", False)
    assert_matches_reference("schane", MANY_CLASSES, backend="triton", dtype=torch.float32, reduction="none",
                             beta=beta)


def test_one_mode_with_ref_rows():
    case = Case("v3_one_ref", b=17, v=3, d=11, labels=tuple(i % 5 for i in range(17)), contrast_mode="one",
                n_ref=9, ref_labels=tuple(i % 7 for i in range(9)))
    for reduction in ("mean", "none"):
        assert_matches_reference("supcon", case, backend="triton", dtype=torch.float32, reduction=reduction)


@pytest.mark.parametrize("kind", LOSSES)
def test_frozen_ref_rows(kind):
    """ref_features without requires_grad (a memory bank): only the features' gradient."""
    feats, labels, ref, ref_labels = make_inputs(MULTI_TILE_REF, dtype=torch.float32)
    grads = []
    for backend in ("triton", "reference"):
        x = feats.clone().requires_grad_(True)
        fn = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}[kind]
        loss = fn(x, labels, ref_features=ref, ref_labels=ref_labels, backend=backend)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", LOSSES)
def test_bitwise_deterministic(kind):
    feats, labels, ref, ref_labels = make_inputs(MULTI_TILE, dtype=torch.float32)
    first = run_loss(kind, MULTI_TILE, feats, labels, ref, ref_labels, backend="triton", reduction="none")
    second = run_loss(kind, MULTI_TILE, feats, labels, ref, ref_labels, backend="triton", reduction="none")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any PyTorch operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


DEFINITIONS = {"supcon": SupCon(0.1, 0.1), "schane": SCHaNe(0.1, 0.5), "focal": FocalSupCon(0.1, 0.1, 1.0)}


@pytest.mark.parametrize("kind", LOSSES)
def test_host_never_allocates_n_by_n(kind):
    """The engine's host code creates nothing of size N x N (the kernels hold tiles only)."""
    n, d = 512, 5
    x = torch.randn(n, d)
    labels = torch.arange(n) % 7
    engine = triton_engine.TritonEngine(torch.float32)
    definition = DEFINITIONS[kind]
    with _LargestTensor() as probe:
        prep = engine.prepare(x, labels, None, None, n, True)
        _, _, grad, _ = engine.reduced(prep, definition, True, True, False)
        _, valid, stats = engine.rows(prep, definition)
        engine.rows_backward(prep, definition, stats, torch.rand(n), True, False)
    assert grad.shape == (n, d) and valid.all()
    # O(N * D): the largest is the padded copy of the rows (D = 5 -> 16 columns), which the
    # interpreter copies as bytes when it launches a kernel (4 per float32 element)
    assert probe.largest <= 4 * n * 16 < n * n // 4, f"largest tensor has {probe.largest} elements; N x N is {n * n}"


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", [MULTI_TILE, MULTI_TILE_REF], ids=lambda c: c.name)
@pytest.mark.parametrize("kind", LOSSES)
def test_column_splits(kind, case, splits, monkeypatch):
    """The second grid axis (column splits merged on the host in a fixed order) when own blocks are few."""
    monkeypatch.setenv("FASTCON_TRITON_SPLITS", str(splits))
    for reduction in ("mean", "none"):
        assert_matches_reference(kind, case, backend="triton", dtype=torch.float32, reduction=reduction)


@pytest.mark.parametrize("kind", ["supcon", "schane"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_fullgraph_matches_eager(kind, reduction, kernels_really_run):
    """torch.compile(fullgraph=True) of a model plus the loss on the Triton backend: no graph
    break, the eager loss and parameter gradients."""
    loss_fn = {"supcon": FC.supcon_loss, "schane": FC.schane_loss}[kind]
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0])

    def step(compiled):
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 2 * 19)
        x = torch.randn(9, 10)

        def f(x):
            return loss_fn(model(x).view(9, 2, 19), y, backend="triton", reduction=reduction).sum()

        if compiled:
            torch._dynamo.reset()
            f = torch.compile(f, fullgraph=True)
        out = f(x)
        out.backward()
        return out.detach(), model.weight.grad.clone()

    eager, compiled = step(False), step(True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    assert len(kernels_really_run) >= 2


@pytest.mark.parametrize("with_ref", [False, True])
def test_opcheck_triton_operators(with_ref):
    from fastcon.backends import ops

    reduced, rows = ops.OPS["triton"]
    torch.manual_seed(3)
    feats = torch.randn(10, 6, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 0, 2, 3])
    ref = torch.randn(4, 6, requires_grad=True) if with_ref else None
    ref_labels = torch.tensor([1, 3, 4, 0]) if with_ref else None
    args = (feats, labels, ref, ref_labels, "supcon", [0.1, 0.07], 10, True)
    torch.library.opcheck(reduced, args + (True, True, with_ref), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(rows, args, atol=1e-5, rtol=1e-5)
    _, valid, stats = rows(*args)
    plain = (feats.detach(), labels, None if ref is None else ref.detach()) + args[3:]
    torch.library.opcheck(torch.ops.fastcon.triton_rows_backward,
                          plain + (stats, valid, torch.linspace(0.1, 1.0, 10), True, with_ref), atol=1e-5, rtol=1e-5)


def test_second_order_raises_naming_reference():
    x = torch.randn(6, 2, 8, requires_grad=True)
    loss = FC.supcon_loss(x, torch.tensor([0, 1, 0, 1, 2, 2]), backend="triton")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="'triton' backend computes first derivatives only.*backend='reference'"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("definition", [SupCon(0.1, 0.07), SCHaNe(0.2, 1.5), FocalSupCon(0.1, 0.07, 2.0)],
                         ids=["supcon", "schane", "focal"])
def test_tile_stats_equal_the_definition(definition, kernels_really_run):
    """The Triton tile math's statistics of one tile equal the Python loss definition's."""
    from tests.cases import assert_engine_tile_stats

    assert_engine_tile_stats(triton_engine.TritonEngine(torch.float32), definition, dtype=torch.float32,
                             rtol=2e-5, atol=2e-5)
    assert kernels_really_run


def test_every_launch_is_made_under_the_tensors_device(monkeypatch):
    """Every kernel launch (row preparation, statistics, finalize, gradient, split epilogue)
    happens inside the device guard the engine opens from the features' tensor."""
    from fastcon.backends.triton import rows

    current = []
    launches = []

    class Guard:
        def __init__(self, t):
            self.device = t.device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    class Recording:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((self.name, current[-1] if current else None))
                return self.fn[grid](*args, **kwargs)
            return run

    original_kernel = launch.kernel
    monkeypatch.setattr(triton_engine, "_device", Guard)
    for name in ("prep_side", "finalize", "store"):
        monkeypatch.setattr(rows, f"{name}_kernel", Recording(name, getattr(rows, f"{name}_kernel")))
    monkeypatch.setattr(launch, "kernel", lambda name, *a, **k: Recording(name, original_kernel(name, *a, **k)))
    x = torch.randn(7, 2, 11, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    queue, queue_y = torch.randn(5, 11, requires_grad=True), torch.tensor([0, 4, 1, 1, 2])
    for kw in ({}, {"reduction": "none"}, {"contrast_mode": "one"}, {"ref_features": queue, "ref_labels": queue_y}):
        FC.supcon_loss(x, y, backend="triton", **kw).sum().backward()
    FC.focal_supcon_loss(x, y, backend="triton").backward()
    monkeypatch.setenv("FASTCON_TRITON_SPLITS", "2")  # the split epilogue too
    FC.supcon_loss(x, y, backend="triton").backward()
    assert {name for name, _ in launches} == {"prep_side", "stats", "finalize", "grad", "store"}
    assert all(device == x.device for _, device in launches), launches


def test_device_guard_uses_the_tensors_cuda_device(monkeypatch):
    """For CUDA tensors the guard is torch.cuda.device(tensor.device) (here with a stand-in tensor)."""
    import types

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or types.SimpleNamespace())
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    triton_engine._device(fake)
    assert entered == [torch.device("cuda", 1)]


def test_no_host_synchronisation_in_forward_or_backward():
    """Nothing on the engine's path needs a value on the host: no .item() / bool(tensor) /
    .tolist() (aten._local_scalar_dense), no torch.unique, no nonzero or boolean-mask indexing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            indices = args[1] if "index" in name and len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
            bool_index = any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(indices))
            if any(k in name for k in ("_local_scalar_dense", "unique", "nonzero", "masked_select")) or bool_index:
                self.bad.append(name)
            return func(*args, **(kwargs or {}))

    def _flat(args):
        for a in args:
            if isinstance(a, (list, tuple)):
                yield from _flat(a)
            else:
                yield a

    x = torch.randn(18, 19)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0] * 2)
    ref, ref_y = torch.randn(5, 19), torch.tensor([1, 5, 5, 0, 2])
    for definition in (SupCon(), SCHaNe(), FocalSupCon()):
        for ref_args, anchors in (((None, None), 18), ((ref, ref_y), 18), ((None, None), 9)):
            engine = triton_engine.TritonEngine(torch.float32)
            with Record() as rec:
                prep = engine.prepare(x, y, *ref_args, anchors, True)
                need_r = ref_args[0] is not None
                engine.reduced(prep, definition, True, True, need_r)
                _, _, stats = engine.rows(prep, definition)
                engine.rows_backward(prep, definition, stats, torch.ones(anchors), True, need_r)
            assert not rec.bad, (definition.name, rec.bad)


@pytest.mark.parametrize("kind", LOSSES)
def test_extreme_labels_and_unlabelled_bank(kind):
    """Labels are compared, never used in arithmetic (int64 extremes), and unlabelled bank rows
    are negatives of every anchor: the same numbers as small labels give."""
    fn = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}[kind]
    big, small = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
    torch.manual_seed(0)
    x = torch.randn(9, 2, 11)
    ref = torch.randn(7, 11)
    out = []
    extreme = torch.tensor([big, small, big, 3, small, big, 3, 3, small])
    for labels in (extreme, torch.tensor([2, 0, 2, 1, 0, 2, 1, 1, 0])):
        f = x.clone().requires_grad_(True)
        loss = fn(f, labels, ref_features=ref, backend="triton", reduction="none")
        loss.sum().backward()
        out.append((loss.detach(), f.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
