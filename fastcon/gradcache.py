"""Gradient caching: a contrastive step over a batch larger than activation memory allows.

A contrastive loss couples every row of the batch, so the batch cannot simply be split
into micro-batches whose gradients are accumulated: each micro-batch would only contrast
against itself. Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup") gets the exact full-batch gradient with the
activation memory of one chunk:

1. forward every chunk of inputs without building a graph, keeping only the outputs
   (embeddings, logits) and the random number generator state each chunk started from;
2. treat the concatenated outputs as leaf tensors, compute the loss once over the whole
   batch and differentiate it with respect to them: the "cached" output gradients;
3. forward each chunk again, with a graph and the same random state (so dropout and
   drop-path draw the same masks), and backpropagate the chunk's cached gradients into
   the parameters, where they accumulate.

The loss sees the same rows as in a plain step, and by linearity of the backward pass the
parameter gradients are those of a plain step, at the price of a second forward pass.
The rows held across chunks are the outputs only, and fastcon's losses themselves never
hold the ``N x N`` similarities, so the batch is bounded by the size of its outputs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .distributed.collectives import group_rank_and_size

__all__ = ["GradCache"]

# gradients are all-reduced in flat buckets of at most this many bytes, as DDP's default
_BUCKET_BYTES = 25 * 2 ** 20


class GradCache:
    """Exact large-batch training steps, one chunk of activations at a time.

    Args:
        model: the ``nn.Module`` being trained (a ``DistributedDataParallel`` wrapper
            included). Unless ``forward`` is given, ``model(chunk)`` computes a chunk's
            outputs.
        loss_fn: called once per step on the whole batch's outputs: ``loss_fn(outputs,
            *args, **kwargs)`` when the model returns one tensor or a dict of tensors, and
            ``loss_fn(*outputs, *args, **kwargs)`` when it returns a tuple, e.g. ``(features,
            logits)`` for :class:`fastcon.CLCELoss`. ``args`` / ``kwargs`` are the extra
            arguments of :meth:`step` (labels, ``ref_features=`` of a memory bank ...).
        chunk_size: rows of the inputs per forward pass (a positive int). The last chunk
            may be smaller, so it need not divide the batch.
        forward: optional ``forward(chunk) -> outputs`` used instead of ``model(chunk)``,
            e.g. ``lambda x: model(x, heads, None)``. With a DDP wrapper as ``model`` it
            must call the wrapper, so that DDP all-reduces (checked on the last chunk).
        autocast: optional zero-argument callable returning a context manager to run
            the forward passes and the loss under, e.g. ``lambda: torch.autocast("cuda",
            dtype=torch.bfloat16)``. Calling :meth:`step` inside an autocast region works
            too.
        scaler: optional ``torch.amp.GradScaler``; the loss is scaled before the cached
            gradients are computed, so the parameters receive scaled gradients and the
            caller goes on with ``scaler.step(optimizer); scaler.update()`` as usual.
        sync_gradients: None (default), True or False: who averages the gradients over
            the ranks (see "Distributed" below). True: GradCache all-reduces the gradients
            of ``model``'s parameters once per step, for a ``model`` under a DDP wrapper
            that is called directly. False: GradCache neither does nor checks that
            anything does. None: the DDP wrapper passed as ``model`` does, and with
            several processes any other ``model`` is refused.
        process_group: the group to average over with ``sync_gradients=True`` (default:
            the whole world, as DDP's default).

    Outputs are concatenated along dim 0 in chunk order, so the loss sees exactly the
    batch layout of a plain step (a chunk's outputs may have more or fewer rows than its
    inputs, as long as the second pass gives the same shapes). Chunking is along dim 0 of
    the inputs: inputs ``[B, V, ...]`` with a model returning ``[b, V, D]`` give fastcon's
    ``[B, V, D]`` features; rows ``[V*B, ...]`` (all of view 0 first, as the harness
    builds them) give ``[V*B, D]`` rows for the loss to reshape. A model whose output rows
    depend on other rows of its chunk (batch norm in training mode, in-batch mixing) sees
    smaller batches than in a plain step, and then the gradients are not the plain step's.

    Randomness: the global CPU generator and the CUDA generators of the devices in use
    are saved per chunk and restored for the second pass, after which they continue as
    if every chunk had run once. Explicit ``torch.Generator`` objects inside the model
    are not replayed; draw augmentations before the step and pass the augmented inputs.

    Batch norm: the first pass leaves the running statistics of every normalisation layer
    of ``model`` (``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*`` tracking them) as it
    found them, so only the second pass updates them: once per chunk, as a plain step run
    chunk by chunk would. When one chunk covers the batch, the statistics, outputs and
    gradients are the plain step's; with smaller chunks each chunk is normalised by its own
    statistics and counts as one batch of the running statistics (``num_batches_tracked``
    grows by the number of chunks).

    Distributed: the parameters must end the step with DDP's averaged gradients, so:

    * ``model`` a ``DistributedDataParallel`` wrapper (anything with ``no_sync()``): every
      chunk but the last runs its backward in ``model.no_sync()`` and DDP all-reduces once
      per step. ``forward`` must call ``model`` itself for the last chunk, or the step raises.
    * ``model`` a module under a DDP wrapper (``ddp.module``, or an encoder inside a
      ``LightningModule`` that Lightning wraps in DDP): its forward bypasses DDP, which then
      never all-reduces. Pass ``sync_gradients=True`` and GradCache all-reduces the
      gradients of ``model``'s parameters after the last chunk, averaged over the ranks of
      ``process_group`` as DDP does.
    * With more than one process (``torch.distributed`` initialised, world size above 1),
      a ``model`` without ``no_sync()`` and ``sync_gradients`` left unset is refused rather
      than trained on local gradients; ``sync_gradients=False`` says the gradients are
      synchronised elsewhere (or meant to stay local).

    Use the losses with ``gather=True`` so the whole batch contrasts against every rank's
    rows; every rank must run the same number of chunks (equal per-rank batches). The
    returned loss is then this rank's share scaled by the world size (see
    :mod:`fastcon.distributed`); log :func:`fastcon.distributed.global_loss_value` of it.

    Example::

        cache = fastcon.GradCache(model, fastcon.SupConLoss(temperature=0.1), chunk_size=32)
        optimizer.zero_grad()
        loss = cache.step(images, labels, **bank.ref_kwargs())  # images [B, 2, C, H, W]
        optimizer.step()
        bank.push(cache.outputs, labels)                          # detached [B, 2, D]
    """

    def __init__(self, model: Callable, loss_fn: Callable, chunk_size: int, *,
                 forward: Optional[Callable] = None, autocast: Optional[Callable] = None, scaler=None,
                 sync_gradients: Optional[bool] = None, process_group=None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if forward is None and not callable(model):
            raise TypeError(f"model must be callable (or pass forward=), got {type(model).__name__}")
        if not any(sync_gradients is v for v in (None, True, False)):
            raise TypeError(f"sync_gradients must be None, True or False, got {sync_gradients!r}")
        if sync_gradients is True:
            if not isinstance(model, torch.nn.Module):
                raise TypeError("sync_gradients=True all-reduces the gradients of model's parameters, so model must "
                                f"be an nn.Module, got {type(model).__name__}")
            if hasattr(model, "no_sync"):
                raise ValueError("sync_gradients=True is for a module under a DDP wrapper; model is the wrapper "
                                 f"({type(model).__name__}), which all-reduces the gradients itself: leave "
                                 "sync_gradients unset")
        elif process_group is not None:
            raise ValueError("process_group is only used with sync_gradients=True")
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.forward = forward if forward is not None else model
        self.autocast = autocast
        self.scaler = scaler
        self.sync_gradients = sync_gradients
        self.process_group = process_group
        self.outputs: Any = None  # the last step's outputs, concatenated and detached

    # ------------------------------------------------------------------ the step

    def step(self, inputs, *args, **kwargs) -> torch.Tensor:
        """One step: accumulate the whole batch's parameter gradients into ``.grad``.

        ``inputs``: a tensor, or a tuple/list of tensors sharing dim 0, split into chunks
        of ``chunk_size`` rows. ``args`` / ``kwargs`` go to ``loss_fn`` unchunked (labels
        cover the whole batch). Returns the loss, detached and unscaled. Gradients are
        accumulated like ``loss.backward()`` does: zero them before the step.
        """
        chunks = self._split(inputs)
        devices = _cuda_devices(inputs)
        self._check_synchronised()

        # 1. forward without a graph, remembering where each chunk's randomness started; the
        #    second pass is the one that counts for the normalisation layers' statistics
        states, outputs = [], []
        with torch.no_grad(), _running_stats_kept(self.model):
            for chunk in chunks:
                states.append(_rng_state(devices))
                with self._autocast():
                    outputs.append(self._call(chunk))
        rows = [[t.shape[0] for t in _flatten(o)] for o in outputs]  # per chunk, per output
        whole = _concat(outputs)
        del outputs
        leaves = [t.detach().requires_grad_(True) if t.is_floating_point() else t.detach()
                  for t in _flatten(whole)]
        whole = _rebuild(whole, leaves)

        # 2. the loss over the whole batch, differentiated down to the outputs only
        with self._autocast():
            loss = self._loss(whole, args, kwargs)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor; use reduction='mean' or 'sum'")
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        targets = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(scaled, targets, allow_unused=True) if scaled.requires_grad else [None] * len(targets)
        cached = iter(grads)
        grads = [next(cached) if t.requires_grad else None for t in leaves]
        self.outputs = _rebuild(whole, [t.detach() for t in leaves])

        # 3. forward each chunk again with a graph and its random state; push the cached
        #    gradients through it. Under DDP only the last backward all-reduces.
        offsets = [0] * len(leaves)
        no_sync = getattr(self.model, "no_sync", None)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            watch = _wrapper_called(self.model) if last and no_sync is not None else contextlib.nullcontext([True])
            with sync, _replay_rng(states[i], devices):
                with self._autocast(), watch as called:
                    out = _flatten(self._call(chunk))
                if not called:
                    raise RuntimeError(
                        f"forward did not call model ({type(self.model).__name__}) for the last chunk, so it would "
                        "not all-reduce the gradients: make forward call model, or pass the module it wraps as "
                        "model with sync_gradients=True")
                if [t.shape[0] for t in out] != rows[i]:
                    raise RuntimeError(f"chunk {i} gave outputs of {[t.shape[0] for t in out]} rows in the second "
                                       f"pass and {rows[i]} in the first; the model must be deterministic in shape")
                pairs = []
                for k, (o, g) in enumerate(zip(out, grads)):
                    if g is not None and o.requires_grad:
                        pairs.append((o, g[offsets[k]:offsets[k] + rows[i][k]]))
                    offsets[k] += rows[i][k]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                elif last and no_sync is not None:
                    raise RuntimeError("no output of the last chunk needs a gradient; DDP would not all-reduce")
        if self.sync_gradients:
            _all_reduce_gradients(self.model.parameters(), self.process_group)
        return loss.detach()

    # ------------------------------------------------------------------ helpers

    def _check_synchronised(self) -> None:
        """Refuse to leave each rank with its local gradients when nothing says they are synchronised."""
        if self.sync_gradients:
            group_rank_and_size(self.process_group)  # a process_group without torch.distributed: raise now
        if self.sync_gradients is not None or hasattr(self.model, "no_sync"):
            return
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        raise RuntimeError(
            f"GradCache runs on {dist.get_world_size()} processes but nothing would average the gradients over them: "
            f"model ({type(self.model).__name__}) is not a DistributedDataParallel wrapper (a module under one is "
            "called outside DDP's forward, so DDP never all-reduces its gradients). Pass sync_gradients=True "
            "(GradCache then all-reduces model's gradients as DDP does), or the DDP wrapper itself as model, or "
            "sync_gradients=False if the gradients are synchronised elsewhere")

    def _autocast(self):
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def _call(self, chunk):
        out = self.forward(*chunk) if isinstance(chunk, tuple) else self.forward(chunk)
        _check_outputs(out)
        return out

    def _loss(self, whole, args, kwargs):
        if isinstance(whole, tuple):
            return self.loss_fn(*whole, *args, **kwargs)
        return self.loss_fn(whole, *args, **kwargs)

    def _split(self, inputs):
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() == 0 or inputs.shape[0] == 0:
                raise ValueError(f"inputs must have at least one row along dim 0, got shape {tuple(inputs.shape)}")
            return list(inputs.split(self.chunk_size))
        if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
            rows = {t.shape[0] if t.dim() else None for t in inputs}
            if len(rows) != 1 or None in rows or 0 in rows:
                raise ValueError("the input tensors must share a non-empty dim 0, got shapes "
                                 + ", ".join(str(tuple(t.shape)) for t in inputs))
            return list(zip(*(t.split(self.chunk_size) for t in inputs)))
        raise TypeError("inputs must be a tensor or a non-empty tuple/list of tensors, "
                        f"got {type(inputs).__name__}")


def _check_outputs(out) -> None:
    parts = _flatten(out)
    if not parts or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in parts):
        raise TypeError("the model must return a tensor, or a tuple/list/dict of tensors, with rows along dim 0; "
                        f"got {type(out).__name__}")


def _flatten(out) -> list:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def _rebuild(template, parts: list):
    if isinstance(template, dict):
        return dict(zip(template.keys(), parts))
    if isinstance(template, tuple):
        return tuple(parts)
    return parts[0]


def _concat(outputs: list):
    first = outputs[0]
    columns = zip(*(_flatten(o) for o in outputs))
    parts = [torch.cat(column) for column in columns]
    return _rebuild(dict(first) if isinstance(first, dict) else tuple(first) if isinstance(first, (tuple, list))
                    else first, parts)


def _cuda_devices(inputs) -> list:
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    devices = {t.device.index if t.device.index is not None else torch.cuda.current_device()
               for t in tensors if t.device.type == "cuda"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())  # inputs on the CPU, model on the GPU
    return sorted(devices)


def _rng_state(devices: list):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


@contextlib.contextmanager
def _replay_rng(state, devices: list):
    """Run with the saved generator states, then put the generators back where they were."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for device, s in zip(devices, cuda):
            torch.cuda.set_rng_state(s, device)
        yield


@contextlib.contextmanager
def _wrapper_called(model):
    """Yields a list that is non-empty once ``model`` itself has been called."""
    called = []
    if not isinstance(model, torch.nn.Module):  # cannot watch it: trust it
        yield [True]
        return
    handle = model.register_forward_pre_hook(lambda module, args: called.append(True))
    try:
        yield called
    finally:
        handle.remove()


@contextlib.contextmanager
def _running_stats_kept(model):
    """Put the running statistics of ``model``'s normalisation layers back as they were on exit."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.parameter import is_lazy

    layers = [m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    saved = [None if any(is_lazy(b) for b in m._buffers.values() if b is not None)
             else {k: b.clone() for k, b in m._buffers.items() if b is not None} for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(layers, saved):
                if buffers is None:  # a lazy layer sized by this pass: back to its initial statistics
                    m.reset_running_stats()
                else:
                    for k, b in buffers.items():
                        m._buffers[k].copy_(b)


def _all_reduce_gradients(parameters, process_group=None) -> None:
    """Average the ``.grad`` of ``parameters`` over the ranks of ``process_group``, as DDP does.

    A parameter without a gradient on this rank counts as a zero gradient when another rank
    has one; one that has no gradient on any rank keeps ``None``. Every rank must call this
    with the same parameters in the same order. Without an initialised group, or with one
    process, it does nothing.
    """
    info = group_rank_and_size(process_group)
    params = [p for p in parameters if p.requires_grad]
    if info is None or info[1] == 1 or not params:
        return
    world = info[1]
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError("sync_gradients=True handles dense gradients only; got a sparse gradient for a "
                             f"parameter of shape {tuple(p.shape)}")
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad, group=process_group)
    params = [p for p, n in zip(params, has_grad.tolist()) if n]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets = {}  # (device, dtype) -> lists of gradients of at most _BUCKET_BYTES together
    for p in params:
        lists = buckets.setdefault((p.grad.device, p.grad.dtype), [[]])
        if lists[-1] and sum(g.nbytes for g in lists[-1]) + p.grad.nbytes > _BUCKET_BYTES:
            lists.append([])
        lists[-1].append(p.grad)
    for lists in buckets.values():
        for grads in lists:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat.div_(world)  # DDP divides before summing
            dist.all_reduce(flat, group=process_group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
