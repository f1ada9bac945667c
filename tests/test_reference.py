"""The dense reference against docs/semantics.md's formulas written as explicit Python loops."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastcon.functional as FC
from tests.cases import CASES, make_inputs


def _flatten(feats, labels):
    if feats.dim() == 3:
        b, v, _ = feats.shape
        labels = list(range(b)) if labels is None else labels.tolist()
        rows = [feats[i, j] for j in range(v) for i in range(b)]  # view-major
        return rows, [labels[i] for j in range(v) for i in range(b)], b
    return list(feats), labels.tolist(), feats.shape[0]


def _setup(case):
    feats, labels, ref, ref_labels = make_inputs(case)
    z, y, b = _flatten(feats, labels)
    z = [r / r.norm() for r in z]
    contrast, yc = list(z), list(y)
    if ref is not None:
        contrast += [r / r.norm() for r in ref]
        yc += ref_labels.tolist()
    anchors = range(len(z)) if case.contrast_mode == "all" else range(b)
    return feats, labels, ref, ref_labels, z, y, contrast, yc, anchors


def _loop_losses(case, kind, t, tb=0.07, beta=1.0, gamma=1.0):
    _, _, _, _, z, y, contrast, yc, anchors = _setup(case)
    out, valid = [], []
    for i in anchors:
        s = {j: float(z[i] @ contrast[j]) / t for j in range(len(contrast)) if j != i}
        P = [j for j in s if yc[j] == y[i]]
        N = [j for j in s if yc[j] != y[i]]
        lse_a = math.log(sum(math.exp(v) for v in s.values())) if s else -math.inf
        if kind == "supcon":
            ok = len(P) > 0
            li = -(t / tb) * sum(s[p] - lse_a for p in P) / len(P) if ok else 0.0
        elif kind == "schane":
            ok = len(P) > 0 and len(N) > 0
            if ok:
                pos = sum(math.exp(s[p]) for p in P) / len(P)
                wsum = sum(math.exp(beta * s[k]) for k in N)
                ng = len(N) * sum(math.exp(beta * s[k]) / wsum * math.exp(s[k]) for k in N)
                li = -math.log(pos / (pos + ng))
            else:
                li = 0.0
        else:
            ok = len(P) > 0
            m = len(contrast)
            li = 0.0
            for p in P:
                prob = math.exp(s[p] - lse_a)
                li += (1 - prob) ** gamma * math.log(prob)
            li = -(t / tb) * li / m if ok else 0.0
        out.append(li)
        valid.append(ok)
    return out, valid


def _call(kind, case, reduction, **kw):
    feats, labels, ref, ref_labels, *_ = _setup(case)
    fn = {"supcon": FC.supcon_loss, "schane": FC.schane_loss, "focal": FC.focal_supcon_loss}[kind]
    if case.contrast_mode != "all":
        kw["contrast_mode"] = case.contrast_mode
    return fn(feats, labels, backend="reference", reduction=reduction, ref_features=ref, ref_labels=ref_labels, **kw)


LOOP_PARAMS = [
    ("supcon", dict(temperature=0.1, base_temperature=0.07), dict(t=0.1, tb=0.07)),
    ("schane", dict(temperature=0.2, beta=0.7), dict(t=0.2, beta=0.7)),
    ("schane", dict(temperature=0.5, beta=0.0), dict(t=0.5, beta=0.0)),
    ("focal", dict(temperature=0.15, base_temperature=0.07, gamma=2.0), dict(t=0.15, tb=0.07, gamma=2.0)),
    ("focal", dict(temperature=0.07, gamma=0.0), dict(t=0.07, gamma=0.0)),
]
PARAMS = [(c, *p) for c in CASES for p in LOOP_PARAMS if c.contrast_mode == "all" or p[0] == "supcon"]


@pytest.mark.parametrize("case,kind,kw,loop_kw", PARAMS, ids=[f"{p[1]}-{p[0].name}-{i}" for i, p in enumerate(PARAMS)])
def test_reference_matches_loops(case, kind, kw, loop_kw):
    want, valid = _loop_losses(case, kind, **loop_kw)
    got = _call(kind, case, "none", **kw)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    n_valid = sum(valid)
    mean = _call(kind, case, "mean", **kw)
    expected_mean = sum(want) / n_valid if n_valid else 0.0
    assert mean.item() == pytest.approx(expected_mean, rel=1e-10, abs=1e-12)
    assert _call(kind, case, "sum", **kw).item() == pytest.approx(sum(want), rel=1e-10, abs=1e-12)


def test_supcon_matches_published_dense_algorithm():
    """With V = 2 every anchor is valid and "mean" equals SupContrast's average (written here
    the way that code computes it: max-subtracted logits, masks, mean over anchors)."""
    torch.manual_seed(0)
    b, v, d, t = 16, 2, 8, 0.07
    feats = F.normalize(torch.randn(b, v, d, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 4, (b,))
    contrast = torch.cat(torch.unbind(feats, dim=1), dim=0)
    mask = (labels[:, None] == labels[None, :]).double().repeat(v, v)
    logits = contrast @ contrast.T / t
    logits = logits - logits.max(dim=1, keepdim=True).values
    logits_mask = 1 - torch.eye(b * v, dtype=torch.float64)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    expected = (-(mask * log_prob).sum(1) / mask.sum(1)).mean()
    got = FC.supcon_loss(feats, labels, temperature=t, backend="reference")
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
