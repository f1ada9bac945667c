"""Contrast across ranks (gloo, CPU): every rank's loss and gradients against one process
on the concatenated batch, computed by the dense reference in float64.

Each world size is one ``torch.multiprocessing.spawn``: the workers run every check in the
same order (so their collectives stay matched), record each check's outcome instead of
raising, and write them to a file; the tests below read one outcome each. Per-rank batch
sizes are deliberately uneven.

Under ``gather=True`` a rank returns ``world * L_r`` (its share of the global loss, scaled
for DDP's averaging), so the checks are: the mean over ranks of the returned losses is the
single-process loss, and each rank's input gradients are ``world`` times the
single-process gradients of its rows (``reduction="none"``: unscaled).
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcon
import fastcon.functional as FC
from tests.cases import TOLERANCES, loss_fn

# 2- and 3-process gloo runs: the slow suite
pytestmark = pytest.mark.slow

# samples per rank: uneven on purpose
RANK_SIZES = {2: [5, 8], 3: [5, 3, 6]}
# (gather, backend, block memory budget): the ring's row statistics are chunked by the
# blockwise budget too, and a few hundred bytes force chunks of one or two anchors
MODES = {
    "gather-blockwise": (True, "blockwise", None),
    "gather-reference": (True, "reference", None),
    "ring": ("ring", "auto", None),
    "ring-small-chunks": ("ring", "auto", 300),
}


@dataclass(frozen=True)
class DistCase:
    """One global problem split over the ranks. ``v`` None: ``[N, D]`` input."""

    name: str
    kind: str  # supcon / schane / focal / clce
    v: Optional[int] = 2
    d: int = 5
    num_classes: Optional[int] = 3  # None: no labels (instance discrimination)
    contrast_mode: str = "all"
    n_ref: int = 0
    ref_labelled: bool = True
    reductions: tuple = ("mean", "sum", "none")


DIST_CASES = [
    DistCase("supcon_v2", "supcon"),
    DistCase("supcon_v3_one", "supcon", v=3, contrast_mode="one"),
    DistCase("supcon_instance", "supcon", num_classes=None),
    DistCase("supcon_rows_singletons", "supcon", v=None, num_classes=9),  # anchors without a positive
    DistCase("supcon_ref", "supcon", n_ref=7),
    DistCase("supcon_instance_ref_unlabelled", "supcon", num_classes=None, n_ref=6, ref_labelled=False),  # MoCo
    DistCase("schane_v2", "schane"),
    DistCase("schane_rows_singletons", "schane", v=None, num_classes=6),
    DistCase("focal_v2", "focal"),
    DistCase("focal_v3", "focal", v=3, num_classes=4),
    DistCase("clce_v2", "clce"),
    DistCase("clce_rows", "clce", v=None, num_classes=4),
]

CHECKS = [f"{c.name}-{r}-{m}" for c in DIST_CASES for r in c.reductions for m in MODES]
CHECKS += [f"no_valid_anchor-{g}" for g in ("gather", "ring")]
CHECKS += [f"ddp_step_{k}-{g}" for k in ("supcon", "clce") for g in ("gather", "ring")]
CHECKS += ["memory_bank_push_gather"]
CHECKS += [f"empty_rank_{k}-{g}" for k in ("supcon", "clce") for g in ("gather", "ring")]
CHECKS += ["dtype_mismatch", "feature_size_mismatch", "engine_dtype_under_gather"]
WORLDS = [2, 3]
JOIN_TIMEOUT_S = 300  # a spawn whose ranks are not all done by then is killed: no check can hang the suite


def _x(rank, d=5):
    return torch.randn(3, 2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))


def _y(rank):
    return torch.tensor([0, 1, rank % 2])


def _clce(rank, **kw):
    logits = kw.pop("logits", torch.randn(3, 3, dtype=torch.float64))
    return FC.clce_loss(_x(rank), logits, kw.pop("labels", _y(rank)), **kw)


# Arguments that fail a check on one rank, or differ between ranks: every rank must raise the
# same error (type and message) before any other collective, and the group must stay usable.
# name: (call(rank, gather), error type, message pattern)
DESYNC = {
    "backend_unavailable": (lambda r, g: FC.supcon_loss(_x(r), _y(r), backend="triton" if r == 1 else "auto",
                                                        gather=g),
                            RuntimeError, r"^rank 1: backend='triton' (is not available|runs on cuda)"),
    "backend_mismatch": (lambda r, g: FC.supcon_loss(_x(r), _y(r), backend="reference" if r == 1 else "blockwise",
                                                     gather=g),
                         ValueError, r"^backend must be the same on every rank, got \['blockwise', 'reference'"),
    "gather_mismatch": (lambda r, g: FC.supcon_loss(_x(r), _y(r), gather=True if r == 0 else "ring"),
                        ValueError, r"^gather must be the same on every rank, got \[True, 'ring'"),
    "reduction_mismatch": (lambda r, g: FC.supcon_loss(_x(r), _y(r), reduction="sum" if r == 1 else "mean",
                                                       gather=g),
                           ValueError, r"^reduction must be the same on every rank, got \['mean', 'sum'"),
    "reduction_invalid": (lambda r, g: FC.supcon_loss(_x(r), _y(r), reduction="avg" if r == 1 else "mean",
                                                      gather=g),
                          ValueError, r"^rank 1: reduction must be one of 'mean', 'sum', 'none', got 'avg'$"),
    "loss_mismatch": (lambda r, g: (FC.schane_loss if r == 1 else FC.supcon_loss)(_x(r), _y(r), gather=g),
                      ValueError, r"^loss must be the same on every rank, got \['supcon', 'schane'"),
    "temperature_mismatch": (lambda r, g: FC.focal_supcon_loss(_x(r), _y(r), temperature=0.1 if r == 1 else 0.2,
                                                               gather=g),
                             ValueError, r"^temperature must be the same on every rank, got \[0.2, 0.1"),
    "temperature_invalid": (lambda r, g: fastcon.SupConLoss(gather=g)(_x(r), _y(r)) if r != 1 else
                            FC.supcon_loss(_x(r), _y(r), temperature=-1.0, gather=g),
                            ValueError, r"^rank 1: temperature must be a finite number > 0, got -1.0$"),
    "contrast_mode_mismatch": (lambda r, g: FC.supcon_loss(_x(r), _y(r), contrast_mode="one" if r == 1 else "all",
                                                           gather=g),
                               ValueError, r"^contrast_mode must be the same on every rank"),
    "labels_invalid": (lambda r, g: FC.supcon_loss(_x(r), _y(r)[:2] if r == 1 else _y(r), gather=g),
                       ValueError, r"^rank 1: labels has 2 entries but the batch size B"),
    "two_ranks_invalid": (lambda r, g: FC.supcon_loss(_x(r), _y(r), reduction="avg" if r != 1 else "mean",
                                                      gather=g),
                          ValueError, r"^rank 0: reduction must be one of .*got 'avg'<others>$"),
    "clce_and_schane": (lambda r, g: _clce(r, gather=g) if r == 1 else FC.schane_loss(_x(r), _y(r), gather=g),
                        ValueError, r"^loss must be the same on every rank, got \['schane', 'clce'"),
    "clce_alpha_mismatch": (lambda r, g: _clce(r, alpha=0.3 if r == 1 else 0.5, gather=g),
                            ValueError, r"^alpha must be the same on every rank, got \[0.5, 0.3"),
    "clce_label_out_of_range": (lambda r, g: _clce(r, labels=torch.tensor([0, 3, 1]) if r == 1 else _y(r), gather=g),
                                ValueError, r"^rank 1: labels must be class indices in \[0, 3\)"),
    "clce_logits_invalid": (lambda r, g: _clce(r, logits=torch.randn(4, 3) if r == 1 else torch.randn(3, 3),
                                               gather=g),
                            ValueError, r"^rank 1: logits \[B, C\] must have B = 3 rows"),
    "clce_reduction_mismatch": (lambda r, g: _clce(r, reduction="none" if r == 1 else "mean", gather=g),
                                ValueError, r"^reduction must be the same on every rank"),
}
DESYNC_CHECKS = [f"desync_{name}-{g}" for name in DESYNC for g in ("gather", "ring")]
DESYNC_CHECKS += ["desync_memory_bank_dim"]
CHECKS += DESYNC_CHECKS


def _global_inputs(case: DistCase, sizes, seed):
    """The concatenated batch (rank 0's samples first): features, labels, ref rows, ref labels, logits."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    shape = (b, case.d) if case.v is None else (b, case.v, case.d)
    feats = torch.randn(shape, generator=g, dtype=torch.float64)
    labels = None if case.num_classes is None else torch.randint(0, case.num_classes, (b,), generator=g)
    ref = ref_labels = None
    if case.n_ref:
        ref = torch.randn(case.n_ref, case.d, generator=g, dtype=torch.float64)
        if case.ref_labelled:
            ref_labels = torch.randint(0, case.num_classes + 2, (case.n_ref,), generator=g)
    logits = None
    if case.kind == "clce":
        logits = torch.randn(shape[:-1] + (case.num_classes,), generator=g, dtype=torch.float64)
    return feats, labels, ref, ref_labels, logits


def _anchor_index(case: DistCase, sizes, rank):
    """Global anchor indices (in the single-process ``"none"`` output) of ``rank``'s anchors."""
    b, start, n = sum(sizes), sum(sizes[:rank]), sizes[rank]
    views = 1 if (case.v is None or case.contrast_mode == "one") else case.v
    return torch.tensor([v * b + start + i for v in range(views) for i in range(n)])


def _loss(case: DistCase, feats, labels, ref, ref_labels, logits, *, reduction, backend, **dist_kwargs):
    if case.kind == "clce":
        return FC.clce_loss(feats, logits, labels, alpha=0.3, temperature=0.2, beta=0.7, reduction=reduction,
                            backend=backend, ref_features=ref, ref_labels=ref_labels, **dist_kwargs)
    fn, kwargs = loss_fn(case.kind)
    if case.contrast_mode != "all":
        kwargs["contrast_mode"] = case.contrast_mode
    return fn(feats, labels, reduction=reduction, backend=backend, ref_features=ref, ref_labels=ref_labels,
              **kwargs, **dist_kwargs)


def _close(got, want, what, kind="grad"):
    rtol, atol = TOLERANCES[torch.float64][kind]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_case(case: DistCase, reduction: str, mode: str, rank: int, world: int, seed: int):
    gather, backend, budget = MODES[mode]
    if budget is not None:
        with fastcon.block_memory(budget):
            return _check_case(case, reduction, mode.split("-")[0], rank, world, seed)
    sizes = RANK_SIZES[world]
    feats, labels, ref, ref_labels, logits = _global_inputs(case, sizes, seed)
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    upstream = torch.rand(feats.shape[0] * (case.v or 1), generator=torch.Generator().manual_seed(seed + 1),
                          dtype=torch.float64)

    # one process on the concatenated batch, by the dense reference
    x = feats.clone().requires_grad_(True)
    r = None if ref is None else ref.clone().requires_grad_(True)
    lg = None if logits is None else logits.clone().requires_grad_(True)
    want = _loss(case, x, labels, r, ref_labels, lg, reduction=reduction, backend="reference")
    if reduction == "none":
        (want * upstream[: want.numel()]).sum().backward()
    else:
        want.backward()

    # this rank's share
    x_r = feats[start:end].clone().requires_grad_(True)
    r_r = None if ref is None else ref.clone().requires_grad_(True)  # every rank passes the same bank
    lg_r = None if logits is None else logits[start:end].clone().requires_grad_(True)
    y_r = None if labels is None else labels[start:end]
    got = _loss(case, x_r, y_r, r_r, ref_labels, lg_r, reduction=reduction, backend=backend, gather=gather)
    if reduction == "none":
        index = _anchor_index(case, sizes, rank)
        (got * upstream[index]).sum().backward()
        _close(got.detach(), want.detach()[index], "per-anchor losses", "loss")
        scale = 1.0
    else:
        mean_over_ranks = fastcon.distributed.all_reduce_sum(got) / world
        got.backward()
        _close(mean_over_ranks, want.detach(), "loss averaged over ranks", "loss")
        scale = float(world)
    _close(x_r.grad, scale * x.grad[start:end], "features grad")
    if lg_r is not None:
        _close(lg_r.grad, scale * lg.grad[start:end], "logits grad")
    if r_r is not None:
        _close(fastcon.distributed.all_reduce_sum(r_r.grad), scale * r.grad, "ref_features grad summed over ranks")


def _check_no_valid_anchor(gather, rank, world):
    # one row per rank, every label distinct: no anchor has a positive anywhere
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    loss = FC.supcon_loss(x, torch.tensor([rank]), gather=gather)
    loss.backward()
    assert loss.item() == 0.0, f"loss {loss.item()}"
    assert torch.equal(x.grad, torch.zeros_like(x)), x.grad


def _ddp_step(kind: str, gather, rank: int, world: int, seed: int):
    """One SGD step of a tiny model under DDP equals one step of a single process on the whole batch."""
    sizes = RANK_SIZES[world]
    b, start, end = sum(sizes), sum(sizes[:rank]), sum(sizes[: rank + 1])
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(b, 2, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (b,), generator=g)

    def make_model():
        torch.manual_seed(seed)
        return torch.nn.Linear(6, 7, dtype=torch.float64)  # 4 feature columns + 3 class logits

    def loss_of(model, x, y, **dist_kwargs):
        out = model(x)
        if kind == "clce":
            return FC.clce_loss(out[..., :4], out[..., 4:], y, alpha=0.4, temperature=0.3, **dist_kwargs)
        return FC.supcon_loss(out[..., :4], y, temperature=0.3, **dist_kwargs)

    single = make_model()
    opt = torch.optim.SGD(single.parameters(), lr=0.5)
    loss_of(single, inputs, labels, backend="reference").backward()
    opt.step()

    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    loss_of(ddp, inputs[start:end], labels[start:end], gather=gather).backward()
    opt.step()
    for (name, p_single), p_ddp in zip(single.named_parameters(), ddp.module.parameters()):
        _close(p_ddp.detach(), p_single.detach(), f"parameter {name} after one step")


def _check_empty_rank(kind, gather, rank, world):
    """Rank 1's batch is empty (an uneven last batch): it contributes no anchors and no rows,
    the others train on, and every rank's values equal one process on the concatenation."""
    sizes = [4, 0, 5][:world]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(sizes), 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x_r = x.detach()[start:end].clone().requires_grad_()
    lg_r = lg.detach()[start:end].clone().requires_grad_()

    def loss(f, logits, labels, **kw):
        if kind == "clce":
            return FC.clce_loss(f, logits, labels, temperature=0.5, **kw)
        return FC.supcon_loss(f, labels, temperature=0.5, **kw)

    want = loss(x, lg, y, backend="reference")
    want.backward()
    got = loss(x_r, lg_r, y[start:end], gather=gather)
    got.backward()
    _close(fastcon.distributed.all_reduce_sum(got.detach()) / world, want.detach(), "loss averaged over ranks",
           "loss")
    _close(x_r.grad, world * x.grad[start:end], "features grad")
    if kind == "clce":
        _close(lg_r.grad, world * lg.grad[start:end], "logits grad")


def _check_mismatch(what, rank, world):
    """Ranks whose features differ in dtype or feature size get the same clear error on every
    rank (no hang, no crash inside gloo); the group stays usable afterwards."""
    dtype = torch.float64 if (what == "dtype" and rank == 1) else torch.float32
    d = 6 if (what == "size" and rank == 1) else 5
    x = torch.randn(3, 2, d, dtype=dtype, requires_grad=True)
    try:
        FC.supcon_loss(x, torch.tensor([0, 1, 0]), gather=True)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError("no error for mismatched ranks")
    key = "dtype" if what == "dtype" else "feature size"
    assert key in message and "rank" in message, message
    messages = [None] * world
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, messages  # the same error on every rank
    dist.barrier()


def _check_engine_dtype(rank, world):
    """Under gather=True the registry builds the engine for the input's dtype (bfloat16 users
    keep half-precision tensor-core products on the Triton backend)."""
    from fastcon.backends import REGISTRY, Backend

    built = []
    original = Backend.engine

    def recording(self, dtype):
        built.append((self.name, dtype))
        return original(self, dtype)

    Backend.engine = recording
    try:
        x = torch.randn(3, 2, 8, dtype=torch.bfloat16, requires_grad=True)
        FC.supcon_loss(x, torch.tensor([0, 1, 0]), gather=True, backend="blockwise").backward()
    finally:
        Backend.engine = original
    assert built and all(b == ("blockwise", torch.bfloat16) for b in built), built
    assert REGISTRY["triton"].engine(torch.bfloat16).dot_dtype == torch.bfloat16


def _check_desync(name, gather, rank, world):
    """Every rank raises the same error, then a correct call on every rank gives the
    single-process loss (nothing was left half-done in the group)."""
    call, kind, pattern = DESYNC[name]
    if name == "backend_unavailable" and fastcon.backends.triton_interpreted():
        return  # the Triton interpreter runs the triton backend on CPU: nothing fails
    try:
        call(rank, gather)
    except Exception as exc:  # noqa: BLE001 - compared below
        error = (type(exc).__name__, str(exc))
    else:
        error = None
    errors = [None] * world
    dist.all_gather_object(errors, error)
    assert error is not None, f"no error on rank {rank}; errors by rank: {errors}"
    assert len(set(errors)) == 1, f"ranks raised different errors: {errors}"
    others = r" \(and on rank\(s\) \[2\]\)" if world == 3 else ""  # ranks 0 and 2 fail "two_ranks_invalid"
    assert error[0] == kind.__name__ and re.search(pattern.replace("<others>", others), error[1]), error
    x = torch.cat([_x(r) for r in range(world)])
    y = torch.cat([_y(r) for r in range(world)])
    want = FC.supcon_loss(x, y, backend="reference")
    got = FC.supcon_loss(_x(rank), _y(rank), gather=gather)
    _close(fastcon.distributed.all_reduce_sum(got) / world, want, "loss after the error", "loss")


def _check_memory_bank_dim(rank, world):
    """A rank pushing rows of the wrong size into a gathering bank raises; so does every other
    rank, with the same error, and no rank's bank changes."""
    bank = fastcon.MemoryBank(capacity=10, dim=3)
    rows = torch.randn(2, 4 if rank == 1 else 3)
    try:
        bank.push(rows, torch.tensor([0, 1]), gather=True)
    except ValueError as exc:
        error = str(exc)
    else:
        error = None
    errors = [None] * world
    dist.all_gather_object(errors, error)
    assert error is not None and len(set(errors)) == 1, errors
    assert error.startswith("rank 1: features have 4 columns but the bank stores rows of size 3"), error
    assert len(bank) == 0
    bank.push(torch.randn(2, 3), torch.tensor([0, 1]), gather=True)
    assert len(bank) == 2 * world


def _check_memory_bank_gather(rank, world):
    sizes = RANK_SIZES[world]
    rows = torch.arange(sum(sizes) * 3, dtype=torch.float32).reshape(-1, 3)
    labels = torch.arange(sum(sizes))
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    bank = fastcon.MemoryBank(capacity=100, dim=3)
    bank.push(rows[start:end], labels[start:end], gather=True)
    assert torch.equal(bank.features, rows), "bank rows are not every rank's rows in rank order"
    assert torch.equal(bank.labels, labels)


def _worker(rank, world, port, out_dir):
    faulthandler.enable()  # a crash inside a collective prints where it happened
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    outcome = {}

    def run(name, fn, *args):
        try:
            fn(*args)
            outcome[name] = "ok"
        except Exception:  # noqa: BLE001 - recorded, reported by the test of this check
            outcome[name] = traceback.format_exc()

    try:
        for i, case in enumerate(DIST_CASES):
            for reduction in case.reductions:
                for mode in MODES:
                    run(f"{case.name}-{reduction}-{mode}", _check_case, case, reduction, mode, rank, world, 100 + i)
        for name, gather in (("gather", True), ("ring", "ring")):
            run(f"no_valid_anchor-{name}", _check_no_valid_anchor, gather, rank, world)
            run(f"ddp_step_supcon-{name}", _ddp_step, "supcon", gather, rank, world, 7)
            run(f"ddp_step_clce-{name}", _ddp_step, "clce", gather, rank, world, 8)
        run("memory_bank_push_gather", _check_memory_bank_gather, rank, world)
        for name, gather in (("gather", True), ("ring", "ring")):
            for kind in ("supcon", "clce"):
                run(f"empty_rank_{kind}-{name}", _check_empty_rank, kind, gather, rank, world)
        run("dtype_mismatch", _check_mismatch, "dtype", rank, world)
        run("feature_size_mismatch", _check_mismatch, "size", rank, world)
        run("engine_dtype_under_gather", _check_engine_dtype, rank, world)
        for name in DESYNC:
            for label, gather in (("gather", True), ("ring", "ring")):
                run(f"desync_{name}-{label}", _check_desync, name, gather, rank, world)
        run("desync_memory_bank_dim", _check_memory_bank_dim, rank, world)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(outcome, f)
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's threads occasionally abort ("terminate called
    # without an active exception") while C++ destructors run at exit, after every check has
    # finished and been written (seen with torch 2.14 on CPU).
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_with_deadline(world, out_dir):
    """Run the workers; kill them if they are not all done within ``JOIN_TIMEOUT_S``."""
    context = mp.start_processes(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            return


_OUTCOMES = {}


def _outcomes(world, tmp_path_factory):
    """Run every check once per world size; ``{check: [failure messages of the ranks]}``."""
    if world not in _OUTCOMES:
        out_dir = str(tmp_path_factory.mktemp(f"world{world}"))
        _spawn_with_deadline(world, out_dir)
        merged = {}
        for rank in range(world):
            path = os.path.join(out_dir, f"rank{rank}.json")
            if not os.path.exists(path):
                continue  # killed at the deadline: its checks count as not run
            with open(path) as f:
                for name, result in json.load(f).items():
                    merged.setdefault(name, [])
                    if result != "ok":
                        merged[name].append(f"rank {rank}:\n{result}")
        _OUTCOMES[world] = merged
    return _OUTCOMES[world]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("world", WORLDS)
def test_matches_single_process(world, check, tmp_path_factory):
    outcome = _outcomes(world, tmp_path_factory)
    assert check in outcome, f"check {check} did not run"
    failures = outcome[check]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("gather", [True, "ring"])
def test_without_process_group_gather_is_single_process(gather):
    # no torch.distributed initialised: a world of one, identical to gather=False
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 2])
    got = FC.supcon_loss(x, y, gather=gather)
    torch.testing.assert_close(got, FC.supcon_loss(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_gather_is_refused(bad):
    with pytest.raises(ValueError, match="gather must be"):
        FC.supcon_loss(torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1]), gather=bad)


def test_process_group_without_gather_is_refused():
    with pytest.raises(ValueError, match="gather=True"):
        fastcon.SupConLoss(process_group=object())
