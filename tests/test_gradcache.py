"""Gradient caching (fastcon.GradCache) against plain full-batch steps, in float64.

The reference step runs the same model chunk by chunk *with* a graph (so every chunk draws
its dropout masks from the same generator state as GradCache's chunks do), concatenates
the outputs and calls one loss and one backward. GradCache must give the same loss and
the same parameter gradients to 1e-10 relative; the checks are sensitive enough to notice
a second pass that does not replay the random state (tested below).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcon
import fastcon.gradcache as gradcache

D_IN, HIDDEN, D_OUT, CLASSES = 6, 16, 5, 3
RTOL = 1e-10


class Tiny(torch.nn.Module):
    """Linear-Dropout-Linear on ``[b, V, D_IN]``; returns features ``[b, V, D_OUT]`` and,
    with ``logits=True``, class logits ``[b, V, CLASSES]`` too."""

    def __init__(self, seed=0, logits=False, p=0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Dropout(p), torch.nn.Linear(HIDDEN, D_OUT))
        self.head = torch.nn.Linear(D_OUT, CLASSES) if logits else None
        with torch.no_grad():
            for p_ in self.parameters():
                p_.copy_(torch.randn(p_.shape, generator=g) * 0.5)
        self.double()

    def forward(self, x):
        z = self.body(x)
        return (z, self.head(torch.relu(z))) if self.head is not None else z


def make_loss(kind, **extra):
    if kind == "supcon":
        return fastcon.SupConLoss(temperature=0.3, **extra)
    if kind == "schane":
        return fastcon.SCHaNeLoss(temperature=0.3, beta=0.8, **extra)
    if kind == "focal":
        return fastcon.FocalSupConLoss(temperature=0.3, gamma=1.5, **extra)
    if kind == "clce":
        return fastcon.CLCELoss(alpha=0.4, temperature=0.3, **extra)
    raise ValueError(kind)


def batch(b=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, D_IN, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (b,), generator=g)


def bank_kwargs(seed=2, n=9):
    bank = fastcon.MemoryBank(capacity=16, dim=D_OUT, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    bank.push(torch.randn(n, D_OUT, generator=g, dtype=torch.float64), torch.randint(0, CLASSES + 1, (n,), generator=g))
    return bank


def reference_step(model, loss_fn, x, args, kwargs, chunk_size, seed):
    """Plain step: chunked forward with a graph, one loss over the concatenation, one backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outs = [model(c) for c in x.split(chunk_size)]
    if isinstance(outs[0], tuple):
        whole = tuple(torch.cat(col) for col in zip(*outs))
        loss = loss_fn(*whole, *args, **kwargs)
    else:
        whole = torch.cat(outs)
        loss = loss_fn(whole, *args, **kwargs)
    loss.backward()
    after = torch.rand(3, dtype=torch.float64)  # where the generator stands after the step
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, after


def cached_step(model, loss_fn, x, args, kwargs, chunk_size, seed, **options):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    cache = fastcon.GradCache(model, loss_fn, chunk_size, **options)
    loss = cache.step(x, *args, **kwargs)
    after = torch.rand(3, dtype=torch.float64)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, after, cache


def assert_grads_close(got, want, rtol=RTOL):
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-300)
        assert err <= rtol, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("kind", ["supcon", "schane", "clce", "focal"])
@pytest.mark.parametrize("with_bank", [False, True], ids=["no-bank", "bank"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 64])
def test_gradients_equal_full_batch(kind, with_bank, chunk_size):
    model = Tiny(logits=kind == "clce")
    loss_fn = make_loss(kind)
    x, y = batch()
    bank = bank_kwargs() if with_bank else None
    kwargs = bank.ref_kwargs() if bank is not None else {}
    want_loss, want, want_after = reference_step(model, loss_fn, x, (y,), kwargs, chunk_size, seed=5)
    got_loss, got, got_after, cache = cached_step(model, loss_fn, x, (y,), kwargs, chunk_size, seed=5)
    assert not got_loss.requires_grad
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=0)
    assert_grads_close(got, want)
    # the generators continue as after one plain step
    assert torch.equal(got_after, want_after)
    # the cached outputs are what the loss saw, detached: ready for a memory bank
    feats = cache.outputs[0] if kind == "clce" else cache.outputs
    assert feats.shape == (10, 2, D_OUT) and not feats.requires_grad
    if bank is not None:
        bank.push(feats, y)
        assert len(bank) == 16


def test_dropout_masks_are_replayed():
    """Without restoring the random state in the second pass the gradients are wrong:
    the check above can fail."""
    model, loss_fn = Tiny(), make_loss("supcon")
    x, y = batch()
    _, want, _ = reference_step(model, loss_fn, x, (y,), {}, 4, seed=5)
    original = gradcache._replay_rng
    try:
        gradcache._replay_rng = lambda state, devices: contextlib.nullcontext()
        _, got, _, _ = cached_step(model, loss_fn, x, (y,), {}, 4, seed=5)
    finally:
        gradcache._replay_rng = original
    with pytest.raises(AssertionError, match="relative error"):
        assert_grads_close(got, want)


def test_dict_outputs_and_tuple_inputs():
    """Harness style: rows [V*B, ...] (view 0 first), a dict of outputs, several inputs."""
    model = Tiny(logits=True)
    loss_fn = fastcon.CLCELoss(alpha=0.7, temperature=0.5)
    x, y = batch(b=7)
    rows = x.transpose(0, 1).reshape(14, D_IN)
    shift = torch.linspace(-1, 1, 14, dtype=torch.float64)[:, None]

    def forward(r, s):
        z, logits = model(r + s)
        return {"projections": z, "logits": logits, "ids": torch.arange(r.shape[0])}

    def loss_of(out, labels):
        by_view = lambda t: t.view(2, -1, t.shape[-1]).transpose(0, 1)  # noqa: E731
        return loss_fn(by_view(out["projections"]), by_view(out["logits"]), labels)

    model.zero_grad()
    torch.manual_seed(3)
    outs = [forward(r, s) for r, s in zip(rows.split(5), shift.split(5))]
    want_loss = loss_of({k: torch.cat([o[k] for o in outs]) for k in outs[0]}, y)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(3)
    got_loss = fastcon.GradCache(model, loss_of, 5, forward=forward).step((rows, shift), y)
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=RTOL, atol=0)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want)


def test_outputs_with_more_rows_than_inputs():
    """A chunk of b samples may give 2b output rows (views flattened): the cached gradients
    are sliced by output rows, not input rows."""
    model, loss_fn = Tiny(), make_loss("focal")
    x, y = batch(b=9)
    forward = lambda c: model(c).flatten(0, 1)  # noqa: E731  [b, 2, D] -> [2b, D], sample-major
    loss_of = lambda rows, labels: loss_fn(rows.view(-1, 2, D_OUT), labels)  # noqa: E731
    model.zero_grad()
    torch.manual_seed(4)
    want_loss = loss_of(torch.cat([forward(c) for c in x.split(4)]), y)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(4)
    got_loss = fastcon.GradCache(model, loss_of, 4, forward=forward).step(x, y)
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=RTOL, atol=0)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want)


def test_grad_scaler_scales_cached_gradients():
    class Scaler:  # what GradCache uses of torch.amp.GradScaler
        def scale(self, loss):
            return loss * 1024.0

    model, loss_fn = Tiny(), make_loss("supcon")
    x, y = batch()
    want_loss, want, _ = reference_step(model, loss_fn, x, (y,), {}, 3, seed=1)
    got_loss, got, _, _ = cached_step(model, loss_fn, x, (y,), {}, 3, seed=1, scaler=Scaler())
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=0)  # returned unscaled
    assert_grads_close({n: g / 1024 for n, g in got.items()}, want)


def test_torch_grad_scaler_step_equals_unscaled_step():
    """With torch's own GradScaler the optimizer step (which unscales) matches a plain step."""
    x, y = batch()
    loss_fn = make_loss("schane")
    plain, scaled = Tiny(), Tiny()
    reference_step(plain, loss_fn, x, (y,), {}, 4, seed=3)
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    optimizer = torch.optim.SGD(scaled.parameters(), lr=0.1)
    torch.manual_seed(3)
    fastcon.GradCache(scaled, loss_fn, 4, scaler=scaler).step(x, y)
    assert scaled.body[0].weight.grad.norm() > 1000 * plain.body[0].weight.grad.norm()  # scaled gradients
    scaler.step(optimizer)
    scaler.update()
    for (name, want), got in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


def test_autocast_context():
    """bfloat16 autocast on the CPU: both passes run under it; the result is the plain
    autocast step's (to bfloat16 accuracy: the two steps accumulate in a different order)."""
    model = Tiny().float()
    loss_fn = make_loss("supcon")
    x, y = batch()
    x = x.float()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    model.zero_grad()
    torch.manual_seed(2)
    with autocast():
        outs = torch.cat([model(c) for c in x.split(4)])
        assert outs.dtype == torch.bfloat16
        want_loss = loss_fn(outs, y)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    got_loss, got, _, _ = cached_step(model, loss_fn, x, (y,), {}, 4, seed=2, autocast=autocast)
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(got, want, rtol=2e-2)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError),
                                        ("8", TypeError), (None, TypeError)])
def test_bad_chunk_size(bad, error):
    with pytest.raises(error, match="chunk_size must be a positive int"):
        fastcon.GradCache(Tiny(), make_loss("supcon"), bad)


def test_bad_inputs_and_loss():
    cache = fastcon.GradCache(Tiny(), make_loss("supcon"), 4)
    with pytest.raises(ValueError, match="at least one row"):
        cache.step(torch.zeros(0, 2, D_IN, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="share a non-empty dim 0"):
        cache.step((torch.zeros(3, 2, D_IN), torch.zeros(4)), None)
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        cache.step("images", None)
    x, y = batch()
    with pytest.raises(ValueError, match="scalar"):
        fastcon.GradCache(Tiny(), fastcon.SupConLoss(reduction="none"), 4).step(x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        fastcon.GradCache(Tiny(), "supcon", 4)
    with pytest.raises(TypeError, match="model must return a tensor"):
        fastcon.GradCache(Tiny(), make_loss("supcon"), 4, forward=lambda c: "nope").step(x, y)


# ----------------------------------------------------------------------------- batch norm

class TinyBN(torch.nn.Module):
    """Linear-BatchNorm-ReLU-Linear on ``[b, V, D_IN]``; the batch norm sees the ``b * V`` rows
    of a chunk together. ``lazy``: a ``LazyBatchNorm1d``, sized by its first call."""

    def __init__(self, seed=0, lazy=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.first = torch.nn.Linear(D_IN, HIDDEN)
        self.norm = torch.nn.LazyBatchNorm1d() if lazy else torch.nn.BatchNorm1d(HIDDEN)
        self.last = torch.nn.Linear(HIDDEN, D_OUT)
        with torch.no_grad():
            for p_ in (*self.first.parameters(), *self.last.parameters()):
                p_.copy_(torch.randn(p_.shape, generator=g) * 0.5)
        self.double()

    def forward(self, x):
        h = self.first(x)
        h = self.norm(h.flatten(0, 1)).view_as(h)
        return self.last(torch.relu(h))


def running_stats(model):
    return {k: v.clone() for k, v in model.norm.state_dict().items() if k.startswith(("running", "num_batches"))}


@pytest.mark.parametrize("chunk_size", [10, 4], ids=["chunk-covers-batch", "chunks-of-4"])
@pytest.mark.parametrize("lazy", [False, True], ids=["batchnorm", "lazy-batchnorm"])
def test_batchnorm_running_stats_updated_once(chunk_size, lazy):
    """The first pass must not move the running statistics: after the step they are those of
    the plain step run chunk by chunk (one update per chunk), and so are the gradients."""
    loss_fn = make_loss("supcon")
    x, y = batch()
    plain, cached = TinyBN(lazy=lazy), TinyBN(lazy=lazy)
    _, want, _ = reference_step(plain, loss_fn, x, (y,), {}, chunk_size, seed=0)
    _, got, _, _ = cached_step(cached, loss_fn, x, (y,), {}, chunk_size, seed=0)
    assert_grads_close(got, want)
    want_stats, got_stats = running_stats(plain), running_stats(cached)
    chunks = -(-10 // chunk_size)
    assert int(got_stats["num_batches_tracked"]) == chunks
    for name in want_stats:
        torch.testing.assert_close(got_stats[name], want_stats[name], rtol=1e-12, atol=1e-14,
                                   msg=lambda m: f"{name}: {m}")


def test_batchnorm_in_eval_mode_is_left_alone():
    model = TinyBN()
    model.norm.eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
    before = running_stats(model)
    x, y = batch()
    fastcon.GradCache(model, make_loss("supcon"), 4).step(x, y)
    for name, value in running_stats(model).items():
        assert torch.equal(value, before[name]), name


# ----------------------------------------------------------------------------- gradient synchronisation options

class FakeDDP(torch.nn.Module):
    """What GradCache looks at of a DistributedDataParallel wrapper: ``no_sync()`` and being called."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        yield


def test_forward_that_bypasses_the_wrapper_is_refused():
    """With a DDP wrapper as model, a forward that calls the wrapped module directly would
    leave DDP's all-reduce out: the step raises instead of returning local gradients."""
    wrapper = FakeDDP(Tiny())
    x, y = batch()
    with pytest.raises(RuntimeError, match="forward did not call model"):
        fastcon.GradCache(wrapper, make_loss("supcon"), 4, forward=wrapper.module).step(x, y)
    fastcon.GradCache(wrapper, make_loss("supcon"), 4, forward=lambda c: wrapper(c)).step(x, y)  # calls it: fine


def test_sync_gradients_without_process_group_is_a_plain_step():
    """Without torch.distributed (one process) sync_gradients=True changes nothing, so the
    same script runs with and without torchrun."""
    model, loss_fn = Tiny(), make_loss("supcon")
    x, y = batch()
    _, want, _ = reference_step(model, loss_fn, x, (y,), {}, 4, seed=5)
    _, got, _, _ = cached_step(model, loss_fn, x, (y,), {}, 4, seed=5, sync_gradients=True)
    assert_grads_close(got, want)


def test_global_loss_value_of_one_process_is_the_loss():
    loss = make_loss("supcon", gather=True)(Tiny()(batch()[0]), batch()[1])
    logged = fastcon.distributed.global_loss_value(loss)
    assert torch.equal(logged, loss.detach()) and not logged.requires_grad
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        fastcon.distributed.global_loss_value(loss.expand(3))


def test_bad_sync_options():
    with pytest.raises(TypeError, match="sync_gradients must be None, True or False"):
        fastcon.GradCache(Tiny(), make_loss("supcon"), 4, sync_gradients=1)
    with pytest.raises(ValueError, match="process_group is only used with sync_gradients=True"):
        fastcon.GradCache(Tiny(), make_loss("supcon"), 4, process_group=object())
    with pytest.raises(ValueError, match="leave sync_gradients unset"):
        fastcon.GradCache(FakeDDP(Tiny()), make_loss("supcon"), 4, sync_gradients=True)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastcon.GradCache(lambda c: c, make_loss("supcon"), 4, sync_gradients=True)
    cache = fastcon.GradCache(Tiny(), make_loss("supcon"), 4, sync_gradients=True, process_group=object())
    with pytest.raises(RuntimeError, match="process_group was given but torch.distributed is not initialised"):
        cache.step(*batch())


# ----------------------------------------------------------------------------- DDP, 2 processes

RANK_ROWS = 6  # per rank; chunk size 4 does not divide it
# "supcon-unused-head": the model also has a classifier the loss never uses, under
# find_unused_parameters=True, as the harness's DDP does
DDP_KINDS = ("supcon", "clce", "supcon-unused-head")


def _ddp_check(kind, rank, world):
    """GradCache under DDP with gather=True against one process on the concatenated batch,
    where rank r's rows draw their dropout masks from rank r's generator as in the DDP run."""
    x, y = batch(b=RANK_ROWS * world, seed=11)
    seed = lambda r: 40 + r  # noqa: E731
    unused_head = kind == "supcon-unused-head"
    kind = kind.split("-")[0]
    model = Tiny(logits=kind == "clce" or unused_head)
    features_only = (lambda net: lambda c: net(c)[0]) if unused_head else (lambda net: net)  # noqa: E731

    # single process, whole batch
    outs = []
    for r in range(world):
        torch.manual_seed(seed(r))
        outs += [features_only(model)(c) for c in x[r * RANK_ROWS:(r + 1) * RANK_ROWS].split(4)]
    loss_fn = make_loss(kind)
    if kind == "clce":
        want_loss = loss_fn(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), y)
    else:
        want_loss = loss_fn(torch.cat(outs), y)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ddp = torch.nn.parallel.DistributedDataParallel(Tiny(logits=kind == "clce" or unused_head),
                                                    find_unused_parameters=unused_head)
    allreduces = []

    def counting_hook(state, bucket):
        allreduces.append(1)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting_hook)
    gathered = make_loss(kind, gather=True)
    torch.manual_seed(seed(rank))
    mine = slice(rank * RANK_ROWS, (rank + 1) * RANK_ROWS)
    loss = fastcon.GradCache(ddp, gathered, 4, forward=features_only(ddp)).step(x[mine], y[mine])
    got = {n: p.grad for n, p in ddp.module.named_parameters() if n in want}
    assert_grads_close(got, want)
    for n, p in ddp.module.named_parameters():
        assert n in want or p.grad is None or not p.grad.any(), f"unused {n} got a gradient"
    assert len(allreduces) == 1, f"{len(allreduces)} gradient all-reduces in one step"
    mean_loss = loss.clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world, want_loss.detach(), rtol=RTOL, atol=0)


STEPS = 3


class Parent(torch.nn.Module):
    """A LightningModule's shape: an encoder and a head, wrapped in DDP as a whole, whose
    training step calls the encoder directly (never the DDP wrapper)."""

    def __init__(self):
        super().__init__()
        self.encoder = Tiny(p=0.0)
        self.head = torch.nn.Linear(D_OUT, CLASSES, dtype=torch.float64)  # not trained by this loss


def _rank_batches(rank, world):
    """This rank's inputs and labels for each of ``STEPS`` steps."""
    out = []
    for step in range(STEPS):
        x, y = batch(b=RANK_ROWS * world, seed=20 + step)
        mine = slice(rank * RANK_ROWS, (rank + 1) * RANK_ROWS)
        out.append((x[mine], y[mine]))
    return out


def _train(make_step, parameters, rank, world):
    """``STEPS`` SGD steps; ``make_step() -> step(x, y)`` accumulates one step's gradients."""
    parameters = list(parameters)
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    step = make_step()
    for x, y in _rank_batches(rank, world):
        optimizer.zero_grad(set_to_none=True)
        step(x, y)
        optimizer.step()
    return [p.detach().clone() for p in parameters]


def _plain_ddp_parameters(rank, world):
    """Plain DDP training: the whole rank batch in one forward, gather=True, one backward."""
    ddp = torch.nn.parallel.DistributedDataParallel(Tiny(p=0.0))
    loss_fn = make_loss("supcon", gather=True)
    return _train(lambda: lambda x, y: loss_fn(ddp(x), y).backward(), ddp.parameters(), rank, world)


def _assert_parameters_close(got, want, rtol=RTOL):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        err = (g - w).norm() / w.norm()
        assert err <= rtol, f"parameter {i}: relative error {err:.3g} against plain DDP training"


def _cached_parameters(how, rank, world):
    """``STEPS`` GradCache steps (chunks of 4 rows of 6) of the model of :func:`_plain_ddp_parameters`."""
    loss_fn = make_loss("supcon", gather=True)
    if how == "wrapper":
        ddp = torch.nn.parallel.DistributedDataParallel(Tiny(p=0.0))
        return _train(lambda: fastcon.GradCache(ddp, loss_fn, 4).step, ddp.parameters(), rank, world)
    if how in ("module-under-ddp", "module-under-ddp-local"):
        ddp = torch.nn.parallel.DistributedDataParallel(Tiny(p=0.0))
        sync = how == "module-under-ddp"
        return _train(lambda: fastcon.GradCache(ddp.module, loss_fn, 4, sync_gradients=sync).step,
                      ddp.parameters(), rank, world)
    if how == "lightning-style":
        ddp = torch.nn.parallel.DistributedDataParallel(Parent(), find_unused_parameters=True)
        group = dist.new_group([0, 1])
        encoder = ddp.module.encoder
        got = _train(lambda: fastcon.GradCache(encoder, loss_fn, 4, sync_gradients=True, process_group=group).step,
                     ddp.parameters(), rank, world)
        assert all(p.grad is None for p in ddp.module.head.parameters()), "the unused head got a gradient"
        return [p.detach() for p in encoder.parameters()]
    raise ValueError(how)


def _check_training(how, rank, world):
    _assert_parameters_close(_cached_parameters(how, rank, world), _plain_ddp_parameters(rank, world))


def _check_local_gradients_differ(rank, world):
    """sync_gradients=False on a module under DDP trains on local gradients: the comparison
    with plain DDP training above can fail."""
    got = _cached_parameters("module-under-ddp-local", rank, world)
    with pytest.raises(AssertionError, match="relative error"):
        _assert_parameters_close(got, _plain_ddp_parameters(rank, world))


def _check_refused(how, rank, world):
    """Nothing would synchronise the gradients: every rank raises, naming the option, before
    any collective (so no rank waits on another)."""
    ddp = torch.nn.parallel.DistributedDataParallel(Tiny(p=0.0))
    x, y = _rank_batches(rank, world)[0]
    if how == "module-under-ddp":
        with pytest.raises(RuntimeError, match="sync_gradients=True"):
            fastcon.GradCache(ddp.module, make_loss("supcon", gather=True), 4).step(x, y)
    else:  # the wrapper as model, but a forward that bypasses it
        with pytest.raises(RuntimeError, match="forward did not call model"):
            fastcon.GradCache(ddp, make_loss("supcon", gather=True), 4, forward=ddp.module).step(x, y)
    dist.barrier()


def _check_gradient_only_on_some_ranks(rank, world):
    """A parameter with a gradient on rank 0 only is averaged with zeros elsewhere, as DDP does;
    one with a gradient on no rank keeps None."""
    used_on_rank0, unused = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    kept = torch.nn.Parameter(torch.zeros(4))
    kept.grad = torch.full((4,), float(rank + 1))
    if rank == 0:
        used_on_rank0.grad = torch.full((3,), 4.0)
    gradcache._all_reduce_gradients([used_on_rank0, unused, kept])
    assert torch.equal(used_on_rank0.grad, torch.full((3,), 4.0 / world)), used_on_rank0.grad
    assert torch.equal(kept.grad, torch.full((4,), sum(range(1, world + 1)) / world)), kept.grad
    assert unused.grad is None


def _check_global_loss_value(rank, world):
    """The logged value is the loss of one process on the whole batch, on every rank, while
    each rank's own loss is its scaled share."""
    x, y = batch(b=RANK_ROWS * world, seed=31)
    model = Tiny(p=0.0)
    want = make_loss("supcon")(model(x), y).detach()
    mine = slice(rank * RANK_ROWS, (rank + 1) * RANK_ROWS)
    ddp = torch.nn.parallel.DistributedDataParallel(Tiny(p=0.0))
    for get_loss in (lambda: make_loss("supcon", gather=True)(ddp(x[mine]), y[mine]),
                     lambda: fastcon.GradCache(ddp, make_loss("supcon", gather=True), 4).step(x[mine], y[mine])):
        loss = get_loss()
        logged = fastcon.distributed.global_loss_value(loss)
        torch.testing.assert_close(logged, want, rtol=RTOL, atol=0)
        assert not logged.requires_grad
        mine_only = [None] * world
        dist.all_gather_object(mine_only, float(loss))
        assert any(abs(v - float(want)) > 1e-3 for v in mine_only), mine_only  # logging one rank would mislead
    for how in ("sum", "none"):
        loss = make_loss("supcon", gather=True, reduction=how)(ddp(x[mine]), y[mine])
        if how == "sum":
            torch.testing.assert_close(fastcon.distributed.global_loss_value(loss),
                                       make_loss("supcon", reduction="sum")(model(x), y).detach(), rtol=RTOL, atol=0)
        else:
            with pytest.raises(ValueError, match="loss must be a scalar tensor"):
                fastcon.distributed.global_loss_value(loss)


CHECKS = {f"gather-{kind}": (_ddp_check, kind) for kind in DDP_KINDS}
CHECKS.update({f"train-{how}": (_check_training, how) for how in ("wrapper", "module-under-ddp", "lightning-style")})
CHECKS["train-module-under-ddp-local-gradients-differ"] = (_check_local_gradients_differ,)
CHECKS.update({f"refused-{how}": (_check_refused, how) for how in ("module-under-ddp", "forward-bypasses-wrapper")})
CHECKS["gradient-only-on-some-ranks"] = (_check_gradient_only_on_some_ranks,)
CHECKS["global-loss-value"] = (_check_global_loss_value,)


def _worker(rank, world, port, out_path):
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    outcome = {}
    try:
        for name, (fn, *args) in CHECKS.items():
            try:
                fn(*args, rank, world)
                outcome[name] = "ok"
            except (Exception, pytest.fail.Exception):  # noqa: BLE001 - reported by the test (pytest.raises too)
                outcome[name] = traceback.format_exc()
    finally:
        with open(f"{out_path}.{rank}.json", "w") as f:
            json.dump(outcome, f)
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # see tests/test_distributed.py: gloo can abort during interpreter teardown


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, nprocs, timeout):
    """``mp.spawn`` that ends its processes and fails after ``timeout`` seconds instead of hanging."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{nprocs} processes did not finish in {timeout} s")


@pytest.fixture(scope="module")
def ddp_outcomes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gradcache_ddp") / "rank")
    spawn(_worker, (2, _free_port(), out), nprocs=2, timeout=180)
    outcomes = {}
    for rank in range(2):
        with open(f"{out}.{rank}.json") as f:
            for name, result in json.load(f).items():
                outcomes.setdefault(name, []).append(None if result == "ok" else f"rank {rank}:\n{result}")
    return outcomes


@pytest.mark.parametrize("check", list(CHECKS))
def test_two_processes(check, ddp_outcomes):
    results = ddp_outcomes.get(check)
    assert results is not None and len(results) == 2, f"{check} did not run on both ranks"
    failures = [r for r in results if r is not None]
    assert not failures, "\n".join(failures)
