"""The native CPU backend against the dense SupCon algorithm at the small batches where
per-call host work decides (``benchmarks/native_small_n.py`` runs it and writes the results).

For each N, one SupCon ``"mean"`` forward+backward of ``[N/2, 2, D]`` float32 features:

- **operators**: the aten operators one call dispatches (a ``TorchDispatchMode``; each of
  fastcon's compiled operators counts as one, as each of the dense algorithm's matmuls does);
- **time**: the contenders run interleaved (fastcon native, then the dense algorithm, then
  again, ...) so that a noisy machine slows both alike; each sample is the mean of a batch
  of calls, the figure the median of the samples.

The dense algorithm is SupContrast's (:mod:`.supcontrast`) on ``F.normalize``-d features, as
the published code's models feed it.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .. import functional as FC
from .supcontrast import supcontrast_loss


class OperatorCount(TorchDispatchMode):
    """How many aten operators run inside the mode."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def dense_step(features, labels):
    supcontrast_loss(F.normalize(features, dim=-1), labels).backward()


def native_step(features, labels):
    FC.supcon_loss(features, labels, backend="native").backward()


CONTENDERS = {"fastcon-native": native_step, "dense": dense_step}


def inputs(n: int, d: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n // 2, 2, d, generator=g).requires_grad_(True)
    labels = torch.randint(0, classes, (n // 2,), generator=g)
    return features, labels


def operators(step, n: int, d: int = 128, classes: int = 10) -> int:
    features, labels = inputs(n, d, classes)
    step(features, labels)  # first call: imports, caches
    with OperatorCount() as mode:
        step(features, labels)
    return mode.count


def timings(n: int, d: int = 128, classes: int = 10, samples: int = 41, budget_s: float = 0.05) -> dict:
    """Median seconds per call of each contender, sampled interleaved."""
    features, labels = inputs(n, d, classes)
    calls = {}
    for name, step in CONTENDERS.items():  # warm up, and size each sample to about budget_s
        step(features, labels)
        start = time.perf_counter()
        step(features, labels)
        calls[name] = max(1, int(budget_s / max(time.perf_counter() - start, 1e-7)))
    per_call = {name: [] for name in CONTENDERS}
    for _ in range(samples):
        for name, step in CONTENDERS.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                features.grad = None
                step(features, labels)
            per_call[name].append((time.perf_counter() - start) / calls[name])
    return {name: sorted(xs)[len(xs) // 2] for name, xs in per_call.items()}


def run(sizes, d: int = 128, classes: int = 10, samples: int = 41) -> list:
    rows = []
    for n in sizes:
        t = timings(n, d, classes, samples)
        rows.append(dict(N=n, D=d, ops_native=operators(native_step, n, d, classes),
                         ops_dense=operators(dense_step, n, d, classes), us_native=round(t["fastcon-native"] * 1e6, 1),
                         us_dense=round(t["dense"] * 1e6, 1),
                         native_over_dense=round(t["fastcon-native"] / t["dense"], 3)))
    return rows
