"""pytest-benchmark timings of every provider on small batches (``pytest benchmarks/ --benchmark-only``).

The sizes are small so the whole file runs in about a minute on a 2-core CPU; the sweep
over N with memory (``fastcon bench``) is where the scaling shows. Each benchmark is
grouped by loss, mode and size, so pytest-benchmark's table compares providers directly.
"""

from __future__ import annotations

import pytest
import torch

from fastcon.bench.point import make_inputs
from fastcon.bench.providers import available_providers

N, D = 512, 128
PROVIDERS, _SKIPPED = available_providers(torch.device("cpu"))
CASES = [(loss, p) for p in PROVIDERS for loss in p.losses]
IDS = [f"{loss}-{p.name}" for loss, p in CASES]


def _setup(benchmark, loss, provider, mode):
    """The provider's loss function, fresh inputs, and the benchmark's group for ``mode``."""
    features, labels, logits = make_inputs(loss, N, D, torch.float32, "cpu")
    features.requires_grad_(True)
    if logits is not None:
        logits.requires_grad_(True)
    benchmark.group = f"{loss} {mode} N={N} D={D}"
    return provider.build(loss), features, labels, logits


@pytest.mark.parametrize("loss,provider", CASES, ids=IDS)
def test_forward(benchmark, loss, provider):
    loss_fn, features, labels, logits = _setup(benchmark, loss, provider, "forward")

    def forward():
        with torch.no_grad():
            return loss_fn(features, labels, logits)

    value = benchmark(forward)
    assert torch.isfinite(value)


@pytest.mark.parametrize("loss,provider", CASES, ids=IDS)
def test_backward(benchmark, loss, provider):
    loss_fn, features, labels, logits = _setup(benchmark, loss, provider, "backward")

    def setup():
        features.grad = None
        return (loss_fn(features, labels, logits),), {}

    benchmark.pedantic(lambda value: value.backward(), setup=setup, rounds=10, warmup_rounds=1)
    assert torch.isfinite(features.grad).all()


@pytest.mark.parametrize("loss,provider", CASES, ids=IDS)
def test_forward_backward(benchmark, loss, provider):
    loss_fn, features, labels, logits = _setup(benchmark, loss, provider, "forward+backward")

    def step():
        features.grad = None
        value = loss_fn(features, labels, logits)
        value.backward()
        return value

    value = benchmark(step)
    assert torch.isfinite(value) and torch.isfinite(features.grad).all()
