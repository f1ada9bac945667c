"""One benchmark point, measured in a process of its own.

``python -m fastcon.bench.point '<json task>'`` imports torch, builds the inputs and
measures, each after one untimed run:

- ``forward``: the loss without autograd (evaluation);
- ``backward``: ``loss.backward()`` after a forward pass with autograd;
- ``forward+backward``: both together, the cost of the loss in a training step.

It prints one JSON line per mode as soon as that mode is done, so a point killed for
memory in its training half still reports its forward figures. Peak memory on CPU is
the process's peak resident set (``ru_maxrss``), which only grows, so it is read after
the forward runs (forward peak) and after the training runs (training peak); on CUDA
it is ``torch.cuda.max_memory_allocated`` reset before each mode.
A task ``{"idle": true}`` only reports the resident set of a process that imported
torch and fastcon: the floor under every CPU figure.
"""

from __future__ import annotations

import json
import sys
import time

from .measure import peak_rss_mib  # noqa: F401 - the sweep reads it from here
from .providers import TAKES_LOGITS

NUM_CLASSES = 100
VIEWS = 2




def make_inputs(loss: str, n: int, d: int, dtype, device, seed: int = 0):
    """``n`` rows as ``[n/2, 2, d]`` features of ``NUM_CLASSES`` random classes (+ CLCE logits)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = max(1, n // VIEWS)
    features = torch.randn(batch, VIEWS, d, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    logits = None
    if loss in TAKES_LOGITS:
        logits = torch.randn(batch, VIEWS, NUM_CLASSES, generator=g).to(device=device, dtype=dtype)
    return features, labels, logits


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text)


class Timer:
    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def _repeat(step, min_reps: int, max_reps: int, min_time: float):
    """Run ``step()`` (which returns a tuple of durations) at least ``min_reps`` times and until
    ``min_time`` seconds have passed or ``max_reps`` runs were made."""
    samples = []
    start = time.perf_counter()
    while len(samples) < min_reps or (len(samples) < max_reps and time.perf_counter() - start < min_time):
        samples.append(step())
    return samples


def measure(task: dict, emit) -> None:
    import torch

    import fastcon

    from .providers import get_provider

    device = torch.device(task["device"])
    dtype = getattr(torch, task["dtype"])
    loss_name = task["loss"]
    loss_fn = get_provider(task["provider"], device).build(loss_name)
    timer = Timer(device)
    cuda = device.type == "cuda"

    def forward_only(inputs):
        features, labels, logits = inputs
        with torch.no_grad():
            t0 = timer.now()
            loss = loss_fn(features, labels, logits)
            t1 = timer.now()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return (t1 - t0,)

    def training_step(inputs):
        features, labels, logits = inputs
        features.grad = None
        if logits is not None:
            logits.grad = None
        t0 = timer.now()
        loss = loss_fn(features, labels, logits)
        t1 = timer.now()
        loss.backward()
        t2 = timer.now()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return (t1 - t0, t2 - t1)

    def leaf_inputs(n):
        features, labels, logits = make_inputs(loss_name, n, task["D"], dtype, device)
        features.requires_grad_(True)
        if logits is not None:
            logits.requires_grad_(True)
        return features, labels, logits

    inputs = leaf_inputs(task["N"])
    reps = (task["min_reps"], task["max_reps"], task["min_time"])
    mode = "forward"
    try:
        # each mode starts with one untimed run at full size: lazy initialisation, kernel
        # choice for these shapes, first touch of the memory (the first run at large N can
        # take twice as long). Forward runs first so that its peak is read before training's.
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        forward_only(inputs)
        samples = _repeat(lambda: forward_only(inputs), *reps)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
        emit({"mode": "forward", "times_ms": [1e3 * s[0] for s in samples], "peak_mib": peak})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        mode = "forward+backward"
        training_step(inputs)
        samples = _repeat(lambda: training_step(inputs), *reps)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
        emit({"mode": "backward", "times_ms": [1e3 * s[1] for s in samples]})
        emit({"mode": "forward+backward", "times_ms": [1e3 * (s[0] + s[1]) for s in samples], "peak_mib": peak})
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        emit({"mode": mode, "oom": True, "error": f"{type(exc).__name__}: {exc}"[:300]})
    emit({"done": True, "fastcon_version": fastcon.__version__, "device_name": device_name(device)})


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return f"{cpu} ({os.cpu_count()} cores)"


def main(argv) -> int:
    task = json.loads(argv[0])

    def emit(record):
        print(json.dumps(record), flush=True)

    if task.get("idle"):
        import torch

        import fastcon

        emit({"idle_peak_mib": peak_rss_mib(), "torch": torch.__version__, "fastcon": fastcon.__version__})
        return 0
    measure(task, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
