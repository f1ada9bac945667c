"""Shared test cases: odd shapes, the per-dtype tolerance table, and the comparison
of any backend against the dense reference (loss and gradients).

Every backend's test module parametrises over ``CASES`` / ``LOSSES`` and calls
:func:`assert_matches_reference`, so all fast paths pass the same suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

import fastcon.functional as FC


@dataclass(frozen=True)
class Case:
    """One input shape. ``labels`` None means instance discrimination ([B, V, D] only)."""

    name: str
    b: int
    v: Optional[int]  # None: [N, D] input with N = b rows
    d: int
    labels: Optional[tuple]
    contrast_mode: str = "all"
    n_ref: int = 0  # extra contrast rows (ref_features)
    ref_labels: Optional[tuple] = None
    extra: dict = field(default_factory=dict)


def _imbalanced(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # mostly class 0, a few others, and singleton classes (anchors with no positive when V = 1)
    base = torch.randint(0, 3, (n,), generator=g)
    base[: n // 2] = 0
    base[-3:] = torch.tensor([7, 8, 9])[: min(3, n)]
    return tuple(int(x) for x in base)


CASES = [
    Case("v2_balanced", b=13, v=2, d=7, labels=tuple(i % 4 for i in range(13))),
    Case("v3_imbalanced", b=11, v=3, d=5, labels=_imbalanced(11)),
    Case("v1_singletons", b=19, v=None, d=9, labels=_imbalanced(19, seed=1)),  # some anchors lack positives
    Case("v2_instance", b=9, v=2, d=6, labels=None),  # SimCLR: sample index is the label
    Case("v2_one_mode", b=10, v=2, d=5, labels=tuple(i % 3 for i in range(10)), contrast_mode="one"),
    Case("v3_one_mode", b=7, v=3, d=4, labels=(0, 0, 1, 2, 2, 2, 3), contrast_mode="one"),
    Case("v2_ref", b=8, v=2, d=5, labels=tuple(i % 3 for i in range(8)), n_ref=11,
         ref_labels=tuple(i % 5 for i in range(11))),
    Case("n2", b=2, v=None, d=3, labels=(4, 4)),
    Case("one_class", b=6, v=2, d=3, labels=(1,) * 6),
]

LOSSES = ["supcon", "schane", "focal"]

# (rtol, atol) for the loss and for the gradients, per input dtype. Half precision
# inputs are accumulated in float32 by every backend, so the difference comes from
# rounding the inputs and the gradient's final cast.
TOLERANCES = {
    torch.float64: dict(loss=(1e-10, 1e-10), grad=(1e-9, 1e-10)),
    torch.float32: dict(loss=(1e-5, 1e-5), grad=(1e-4, 1e-5)),
    torch.bfloat16: dict(loss=(2e-2, 2e-2), grad=(5e-2, 2e-2)),
    torch.float16: dict(loss=(5e-3, 5e-3), grad=(1e-2, 5e-3)),
}


def make_inputs(case: Case, dtype=torch.float64, seed=0, device="cpu"):
    """Seeded features (and labels, ref rows) for ``case``, created in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.b, case.d) if case.v is None else (case.b, case.v, case.d)
    feats = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    labels = None if case.labels is None else torch.tensor(case.labels, device=device)
    ref = ref_labels = None
    if case.n_ref:
        ref = torch.randn(case.n_ref, case.d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        ref_labels = None if case.ref_labels is None else torch.tensor(case.ref_labels, device=device)
    return feats, labels, ref, ref_labels


def loss_fn(kind: str):
    """The functional form and its keyword arguments (non-default hyper-parameters, so that
    a backend ignoring one of them fails)."""
    if kind == "supcon":
        return FC.supcon_loss, dict(temperature=0.1, base_temperature=0.07)
    if kind == "schane":
        return FC.schane_loss, dict(temperature=0.2, beta=0.7)
    if kind == "focal":
        return FC.focal_supcon_loss, dict(temperature=0.15, base_temperature=0.07, gamma=2.0)
    raise ValueError(kind)


def run_loss(kind, case, feats, labels, ref, ref_labels, *, backend, reduction, **overrides):
    """Loss and the gradients of ``features`` (and ``ref_features``) for one backend.

    For ``reduction="none"`` the upstream gradient is a fixed random vector, so that a
    backend that got the per-anchor weighting wrong fails.
    """
    fn, kwargs = loss_fn(kind)
    kwargs.update(overrides)
    if case.contrast_mode != "all":
        if kind != "supcon":
            raise ValueError("contrast_mode applies to SupCon only")
        kwargs["contrast_mode"] = case.contrast_mode
    x = feats.detach().clone().requires_grad_(True)
    r = None if ref is None else ref.detach().clone().requires_grad_(True)
    loss = fn(x, labels, reduction=reduction, backend=backend, ref_features=r, ref_labels=ref_labels, **kwargs)
    if reduction == "none":
        g = torch.Generator().manual_seed(123)
        upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss)
        (loss * upstream).sum().backward()
    else:
        loss.backward()
    return loss.detach(), x.grad, (None if r is None else r.grad)


def cases_for(kind):
    """The cases that apply to ``kind`` (contrast_mode="one" is SupCon's)."""
    return [c for c in CASES if c.contrast_mode == "all" or kind == "supcon"]


def assert_matches_reference(kind, case, *, backend, dtype=torch.float64, reduction="mean", device="cpu",
                             **overrides):
    feats, labels, ref, ref_labels = make_inputs(case, dtype=dtype, device=device)
    got = run_loss(kind, case, feats, labels, ref, ref_labels, backend=backend, reduction=reduction, **overrides)
    want = run_loss(kind, case, feats, labels, ref, ref_labels, backend="reference", reduction=reduction,
                    **overrides)
    tol = TOLERANCES[dtype]
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == expected_loss_dtype, f"loss dtype {got[0].dtype}, expected {expected_loss_dtype}"
    assert got[1].dtype == dtype, f"gradient dtype {got[1].dtype}, expected {dtype}"
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    rtol, atol = tol["loss"]
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, msg=lambda m: f"loss: {m}")
    rtol, atol = tol["grad"]
    torch.testing.assert_close(got[1].double(), want[1].double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"features grad: {m}")
    if ref is not None:
        torch.testing.assert_close(got[2].double(), want[2].double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"ref_features grad: {m}")


# --- one tile of statistics: an engine's kernel against the Python loss definition ----------

def tile_problem(seed=0, a=9, k=23, d=13, self_offset=2, dtype=torch.float64):
    """Anchors ``[a, d]`` and contrast rows ``[k, d]`` (normalised; anchor i is contrast column
    ``i + self_offset``), int32 class ranks with an imbalanced mix, one anchor whose class has
    no other row (no positive) and contrast rows of a class no anchor has."""
    from fastcon.backends.common import Rows

    g = torch.Generator().manual_seed(seed)
    contrast = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    ranks = torch.tensor([(j * 5) % 4 for j in range(k)], dtype=torch.int32)
    ranks[self_offset + 3] = 7  # that anchor is alone in its class
    ranks[-2:] = 9  # contrast rows of a class no anchor has
    anchors = contrast[self_offset:self_offset + a]
    return (Rows(anchors.to(dtype).contiguous(), ranks[self_offset:self_offset + a].contiguous()),
            Rows(contrast.to(dtype).contiguous(), ranks))


def definition_tile_stats(definition, anchors, contrast, self_offset):
    """``(dense, positive)`` statistics of the whole tile by the Python definition, in float64."""
    s = anchors.x.double() @ contrast.x.double().T / definition.temperature
    same = anchors.ranks[:, None] == contrast.ranks[None, :]
    not_self = torch.ones_like(same)
    if self_offset is not None:
        rows = torch.arange(anchors.x.shape[0])
        not_self[rows, rows + self_offset] = False
    pos = same & not_self
    dense = definition.dense_tile(s.clone(), definition.dense_mask(not_self, pos, ~same))
    return dense, definition.positive_tile(s.clone(), pos, dense)


def assert_engine_tile_stats(engine, definition, *, dtype=torch.float64, rtol=1e-10, atol=1e-10):
    """An engine's ``block_stats`` on one tile equals the definition's statistics, slot by slot
    (the positive part of a definition that reads the dense part is given the finished one)."""
    for self_offset in (2, None):
        anchors, contrast = tile_problem(dtype=dtype, self_offset=2)
        want_d, want_p = definition_tile_stats(definition, anchors, contrast, self_offset)
        got_d, got_p = engine.block_stats(anchors, contrast, self_offset, definition)
        if definition.positive_reads_dense:
            assert got_p is None
            _, got_p = engine.block_stats(anchors, contrast, self_offset, definition, dense=got_d)
        names = [n for n, _ in definition.dense_slots] + [n for n, _ in definition.positive_slots]
        for name, got, want in zip(names, list(got_d.double()) + list(got_p.double()), list(want_d) + list(want_p)):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"slot {name!r}: {m}")
