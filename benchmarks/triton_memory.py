"""Extra memory of the Triton backend's forward+backward, accounted on CPU (no GPU needed).

The engine's host code runs for real on CPU tensors, with every kernel launch replaced by a
no-op, so each buffer the engine allocates on a GPU (sorted rows, row statistics, split
partials, gradient parameters, outputs) is allocated here with the same shape and dtype. A
``TorchDispatchMode`` follows every tensor the engine creates until it is freed and keeps the
peak of live bytes. "Extra" is that peak minus the inputs and the gradient returned to the
caller, as ``benchmarks/bench_triton_gpu.py`` reports ``torch.cuda.max_memory_allocated()`` on
a GPU (which also gave 23.1 MB for SupCon at N = 65536 on an H100).

    python benchmarks/triton_memory.py                      # N = 65536, D = 128, bfloat16, every loss
    python benchmarks/triton_memory.py --n 8192 --d 100 --dtype float16 --sms 108
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref

os.environ.setdefault("FASTCON_TRITON_AUTOTUNE", "0")  # the fixed configuration: launch shapes known on CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fastcon.backends.triton import engine as triton_engine  # noqa: E402
from fastcon.backends.triton import launch, rows  # noqa: E402
from fastcon.losses import DEFINITIONS  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _track(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def measure(loss: str, n: int, d: int, dtype: torch.dtype, anchors: int):
    definition = DEFINITIONS[loss]()
    features = torch.randn(n, d, dtype=dtype)
    labels = torch.randint(0, 100, (n,))
    engine = triton_engine.TritonEngine(dtype)
    weak = {}
    with LiveBytes() as mode:
        prep = engine.prepare(features, labels, None, None, anchors, True)
        _, _, grad, _ = engine.reduced(prep, definition, True, True, False)
        grad_bytes = grad.untyped_storage().nbytes()
        weak["grad"] = grad
        del prep, grad
    return mode.peak - grad_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sms", type=int, default=132, help="streaming multiprocessors the split count assumes (H100: 132)")
    p.add_argument("--limit-mb", type=float, default=64.0)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    launch._sm_count = lambda device: args.sms
    launch._major = lambda device: 9  # the H100's configuration lists
    launch.kernel = lambda *args, **kwargs: _NoLaunch()
    for name in ("prep_side_kernel", "finalize_kernel", "store_kernel"):
        setattr(rows, name, _NoLaunch())
    inputs_mb = args.n * args.d * dtype.itemsize / 2**20
    print(f"Triton engine, forward+backward (one sweep), N={args.n}, D={args.d}, {args.dtype}, {args.sms} SMs; "
          f"inputs {inputs_mb:.1f} MiB and the returned gradient not counted")
    ok = True
    for loss in DEFINITIONS:
        extra = measure(loss, args.n, args.d, dtype, args.n) / 2**20
        ok &= extra <= args.limit_mb
        print(f"{loss:8s} extra {extra:7.1f} MiB  (<= {args.limit_mb:.0f}: {'met' if extra <= args.limit_mb else 'NOT met'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
