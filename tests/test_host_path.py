"""The Triton backend's host path, counted on CPU with the kernels stubbed.

The engine's host code runs for real on CPU tensors; every Triton launch is replaced by a
recorder (the configuration lists and column splits of an H100, 132 SMs), and a
``TorchDispatchMode`` records every aten operator it dispatches. On a GPU each operator that
is not a view or an allocation launches at least one kernel, so the count below bounds the
launches of one forward+backward at the batch sizes people train with. Nothing here checks
the numbers (the interpreted suite does): only how much host work one call takes.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import fastcon.backends as registry  # noqa: E402
import fastcon.functional as FC  # noqa: E402
from fastcon.backends.triton import launch, rows  # noqa: E402

# operators that only make views or allocate: no kernel on a GPU
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
             "as_strided", "slice", "select", "expand", "detach", "alias", "t", "transpose", "unsqueeze", "squeeze",
             "permute", "_reshape_alias", "lift_fresh", "view_as"}
N, D = 8192, 128
MAX_KERNELS, MAX_OPS = 12, 40
# Focal SupCon's positive part reads the finished row log-sum-exp: when the columns are split
# (anchors on a side of their own, fewer row blocks than SMs) it takes a second statistics launch.
MAX_KERNELS_FOCAL_SPLIT = 13


class _Recorder:
    def __init__(self, launches, name):
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stubbed(monkeypatch):
    """Kernels recorded instead of launched, ``backend="triton"`` accepted for CPU tensors."""
    if registry.REGISTRY["triton"].unavailable_reason() is not None:
        pytest.skip("triton is not importable")
    launches = []
    monkeypatch.setenv("FASTCON_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(launch, "_sm_count", lambda device: 132)
    monkeypatch.setattr(launch, "_major", lambda device: 9)
    monkeypatch.setattr(launch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(launch, "kernel", lambda name, *a, **k: _Recorder(launches, name))
    for name in ("prep_side_kernel", "finalize_kernel", "store_kernel"):
        monkeypatch.setattr(rows, name, _Recorder(launches, name))
    monkeypatch.setattr(registry, "resolve", lambda name, device: registry.REGISTRY["triton"])
    return launches


def _count(launches, loss_fn, reduction="mean", **kwargs):
    torch.manual_seed(0)
    x = torch.randn(N // 2, 2, D, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 100, (N // 2,))
    weight = torch.rand(N)
    loss_fn(x, y, backend="triton", reduction=reduction, **kwargs)  # first call: imports, caches
    del launches[:]
    with _Ops() as mode:
        loss = loss_fn(x, y, backend="triton", reduction=reduction, **kwargs)
        if reduction == "none":
            loss.backward(weight)
        else:
            loss.backward()
    kernels = [op for op in mode.ops if op not in NO_KERNEL] + list(launches)
    return kernels, mode.ops


CASES = {
    "mean": {},
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "memory bank": dict(ref_features=torch.randn(4096, D, dtype=torch.bfloat16),
                        ref_labels=torch.randint(0, 100, (4096,))),
    "unlabelled bank, none": dict(reduction="none", ref_features=torch.randn(4096, D, dtype=torch.bfloat16)),
    "contrast_mode one": dict(contrast_mode="one"),
}


LOSS_FNS = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}


@pytest.mark.parametrize("loss,case", [(loss, case) for loss in LOSS_FNS for case in CASES
                                       if loss == "supcon" or "contrast_mode" not in CASES[case]])
def test_forward_backward_launches_few_kernels(stubbed, loss, case):
    kwargs, loss_fn = dict(CASES[case]), LOSS_FNS[loss]
    kernels, ops = _count(stubbed, loss_fn, **kwargs)
    assert kernels.count("stats") >= 1 and kernels.count("grad") >= 1, kernels
    limit = MAX_KERNELS_FOCAL_SPLIT if kernels.count("stats") == 2 and loss_fn is FC.focal_supcon_loss \
        else MAX_KERNELS
    assert len(kernels) <= limit, f"{len(kernels)} kernels: {kernels}"
    assert len(ops) <= MAX_OPS, f"{len(ops)} operators: {ops}"


def test_gather_in_one_process(stubbed, tmp_path):
    """``gather=True`` under an initialised process group of one: the same host path."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        kernels, ops = _count(stubbed, FC.supcon_loss, gather=True)
    finally:
        dist.destroy_process_group()
    assert len(kernels) <= MAX_KERNELS, f"{len(kernels)} kernels: {kernels}"
    assert len(ops) <= MAX_OPS, f"{len(ops)} operators: {ops}"


def test_counting_sees_the_kernels(stubbed):
    """The count is not vacuous: the stubs record the Triton launches, and an extra PyTorch
    operator in the host path shows up in it."""
    kernels, _ = _count(stubbed, FC.supcon_loss)
    assert kernels.count("grad") == 1 and "finalize_kernel" in kernels and "prep_side_kernel" in kernels
    assert "sort" in kernels and "mul" in kernels  # the label sort, the backward's scaling
