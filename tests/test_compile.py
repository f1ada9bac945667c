"""fastcon inside ``torch.compile`` and ``torch.library``.

* ``torch.compile(fullgraph=True)`` of a small model plus each loss, on each CPU backend, gives
  the eager loss and parameter gradients (``reduction`` mean / sum / none, ``ref_features``,
  ``gather=True`` in a one-process group).
* ``torch.library.opcheck`` passes for every custom operator of :mod:`fastcon.backends.ops`.
* Second derivatives: exact on ``backend="reference"`` (gradgradcheck), a clear error naming
  ``reference`` on the fast backends, never a silently wrong value.

(The Triton backend's operators are checked the same way under the interpreter, in
``tests/triton_cases_interpret.py``.)
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import fastcon.functional as FC
from fastcon import CLCELoss, FocalSupConLoss, SCHaNeLoss, SupConLoss
from fastcon.backends import ops

# torch.compile of every loss and backend (minutes of compilation): the slow suite
pytestmark = pytest.mark.slow

CPU_BACKENDS = ["reference", "blockwise", "native"]
LOSSES = {"supcon": SupConLoss, "schane": SCHaNeLoss, "focal": FocalSupConLoss}
B, V, D, C = 7, 2, 12, 3  # 14 rows: no block size divides it


def _native_or_skip(backend):
    if backend == "native":
        import fastcon.native

        if not fastcon.native.is_available():
            pytest.fail(f"the native kernel is unavailable: {fastcon.native.import_error()}")


def _step(backend, loss_name, reduction, *, compiled, with_ref=False, gather=False):
    """Loss and the gradients of every parameter after one backward."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, V * D)).double()
    head = torch.nn.Linear(16, C).double()
    x = torch.randn(B, 16, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # imbalanced, class 2 has one sample
    queue = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    queue_y = torch.tensor([0, 2, 5, 5, 1])
    kw = {"backend": backend, "gather": gather}
    if loss_name == "clce":
        loss_fn = CLCELoss(**kw)

        def f(x, y, queue):
            out = loss_fn(model(x).view(B, V, D), head(x), y,
                          **({"ref_features": queue, "ref_labels": queue_y} if with_ref else {}))
            return out
    else:
        loss_fn = LOSSES[loss_name](reduction=reduction, **kw)

        def f(x, y, queue):
            return loss_fn(model(x).view(B, V, D), y,
                           **({"ref_features": queue, "ref_labels": queue_y} if with_ref else {}))
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True)
    out = f(x, y, queue)
    (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    params = list(model.parameters()) + (list(head.parameters()) if loss_name == "clce" else [])
    grads = [p.grad.clone() for p in params] + ([queue.grad.clone()] if with_ref else [])
    return out.detach(), grads


def _assert_same(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-12, atol=1e-12)
    for ge, gc in zip(eager[1], compiled[1]):
        torch.testing.assert_close(gc, ge, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name,reduction", [("supcon", "mean"), ("supcon", "sum"), ("supcon", "none"),
                                                 ("schane", "mean"), ("schane", "none"), ("focal", "sum"),
                                                 ("focal", "none"), ("clce", "mean")])
def test_compiled_fullgraph_matches_eager(backend, loss_name, reduction):
    _native_or_skip(backend)
    eager = _step(backend, loss_name, reduction, compiled=False)
    compiled = _step(backend, loss_name, reduction, compiled=True)
    _assert_same(eager, compiled)
    # and the backend agrees with the dense reference
    if backend != "reference":
        reference = _step("reference", loss_name, reduction, compiled=False)
        torch.testing.assert_close(eager[0], reference[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name", ["supcon", "focal", "clce"])
def test_compiled_with_ref_features(backend, loss_name):
    _native_or_skip(backend)
    eager = _step(backend, loss_name, "mean", compiled=False, with_ref=True)
    compiled = _step(backend, loss_name, "mean", compiled=True, with_ref=True)
    _assert_same(eager, compiled)


@pytest.fixture(scope="module")
def one_process_group():
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "store"), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name", ["schane", "clce"])
def test_compiled_under_gather_in_one_process(one_process_group, backend, loss_name):
    _native_or_skip(backend)
    eager = _step(backend, loss_name, "mean", compiled=False, gather=True)
    compiled = _step(backend, loss_name, "mean", compiled=True, gather=True)
    _assert_same(eager, compiled)
    plain = _step(backend, loss_name, "mean", compiled=False)
    _assert_same(plain, eager)


def _op_inputs(requires_grad=True, with_ref=False):
    torch.manual_seed(3)
    feats = torch.randn(10, 6, dtype=torch.float64, requires_grad=requires_grad)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 0, 2, 3])
    ref = torch.randn(4, 6, dtype=torch.float64, requires_grad=requires_grad) if with_ref else None
    ref_labels = torch.tensor([1, 3, 4, 0]) if with_ref else None
    return feats, labels, ref, ref_labels


@pytest.mark.parametrize("backend", ["blockwise", "native"])
@pytest.mark.parametrize("loss_name,hyper", [("supcon", [0.1, 0.07]), ("schane", [0.2, 1.0]),
                                             ("focal", [0.1, 0.07, 1.0])])
@pytest.mark.parametrize("with_ref", [False, True])
def test_opcheck_every_operator(backend, loss_name, hyper, with_ref):
    _native_or_skip(backend)
    reduced, rows = ops.OPS[backend]
    feats, labels, ref, ref_labels = _op_inputs(with_ref=with_ref)
    args = (feats, labels, ref, ref_labels, loss_name, hyper, 10, True)
    torch.library.opcheck(reduced, args + (True, True, with_ref))
    torch.library.opcheck(reduced, args + (False, False, False))
    torch.library.opcheck(rows, args)
    row_loss, valid, stats = rows(*args)
    backward_op = getattr(torch.ops.fastcon, f"{backend}_rows_backward")
    weight = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
    plain = (feats.detach(), labels, None if ref is None else ref.detach()) + args[3:]
    torch.library.opcheck(backward_op, plain + (stats, valid, weight, True, with_ref))
    # its own autograd is the clear second-order error
    with pytest.raises(RuntimeError, match=f"{backend!r} backend computes first derivatives only"):
        torch.autograd.grad(backward_op(*args, stats, valid, weight, True, with_ref)[0].sum(), feats)


def test_opcheck_scaled_gradient():
    grad = torch.randn(5, 3, dtype=torch.bfloat16)
    source = torch.randn(5, 3, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fastcon.scaled_gradient, (grad, torch.tensor(0.5), source, "blockwise"))
    torch.library.opcheck(torch.ops.fastcon.scaled_gradient, (grad[:0], torch.tensor(2.0), source, "native"))
    out = torch.ops.fastcon.scaled_gradient(grad, torch.tensor(0.5), source.requires_grad_(), "native")
    with pytest.raises(RuntimeError, match="'native' backend computes first derivatives only"):
        out.float().sum().backward()


def _second_order(backend, reduction, loss_fn=FC.supcon_loss):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 16, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 3])
    loss = loss_fn(x, y, backend=backend, reduction=reduction)
    loss = loss.sum() if reduction == "none" else loss
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    return gg


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_order_reference_is_exact(reduction):
    torch.manual_seed(0)
    x = torch.randn(5, 2, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 2])
    for fn in (FC.supcon_loss, FC.schane_loss, FC.focal_supcon_loss):
        assert torch.autograd.gradgradcheck(lambda t, fn=fn: fn(t, y, backend="reference", reduction=reduction), (x,))
    assert _second_order("reference", reduction).norm() > 0


@pytest.mark.parametrize("backend", ["blockwise", "native", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_fn", [FC.supcon_loss, FC.schane_loss, FC.focal_supcon_loss])
def test_second_order_on_fast_backends_raises_naming_reference(backend, reduction, loss_fn):
    _native_or_skip(backend)
    with pytest.raises(RuntimeError, match=r"first derivatives only.*backend='reference'"):
        _second_order(backend, reduction, loss_fn)


def test_first_order_with_create_graph_still_exact():
    """create_graph=True alone (e.g. a gradient penalty that is never differentiated) is fine."""
    torch.manual_seed(0)
    x = torch.randn(8, 2, 16, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 3])
    (g_fast,) = torch.autograd.grad(FC.supcon_loss(x, y, backend="blockwise"), x, create_graph=True)
    (g_ref,) = torch.autograd.grad(FC.supcon_loss(x, y, backend="reference"), x)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
