"""A MoCo-style queue of past features: extra contrast rows for small batches.

A :class:`MemoryBank` keeps the last ``capacity`` feature rows (detached) and their
labels, and hands them to any loss as ``ref_features`` / ``ref_labels``: contrast-only
rows that are never anchors and get no gradient. Push after the loss, so a batch does
not contrast against itself twice::

    bank = fastcon.MemoryBank(capacity=4096, dim=128)
    loss = loss_fn(features, labels, **bank.ref_kwargs())
    loss.backward()
    bank.push(features, labels)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .inputs import FLOAT_DTYPES, flatten_features
from .distributed import all_gather_rows, group_rank_and_size
from .distributed.collectives import exchange_checks


class MemoryBank(nn.Module):
    """First-in first-out queue of ``capacity`` detached feature rows of size ``dim``, with labels.

    ``push`` takes ``[N, D]`` features (with ``[N]`` labels) or ``[B, V, D]`` (with ``[B]``
    labels), flattened view-major like the losses do, so every view is one row. A bank
    pushed without labels holds unlabelled rows, which the losses treat as negatives of
    every anchor (MoCo); a bank is either labelled or not, from its first push on.

    Rows are kept in ``dtype`` (default float32) on the bank's device; the bank is an
    ``nn.Module`` whose queue is in its buffers, so ``.to(device)`` moves it and its
    ``state_dict`` checkpoints it.
    """

    def __init__(self, capacity: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, value in (("capacity", capacity), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.capacity, self.dim = capacity, dim
        self.register_buffer("queue", torch.zeros(capacity, dim, dtype=dtype, device=device))
        self.register_buffer("queue_labels", torch.zeros(capacity, dtype=torch.int64, device=device))
        # next row to overwrite, number of filled rows, and whether the rows carry labels
        # (-1: nothing pushed yet): tensors so that state_dict() saves them
        self.register_buffer("write_index", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("size", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("labelled", torch.full((), -1, dtype=torch.int64, device=device))

    def __len__(self) -> int:
        return int(self.size)

    @property
    def features(self) -> Optional[torch.Tensor]:
        """The stored rows ``[len, dim]`` in storage order (None while empty).

        The order is not the push order once the queue wraps; no loss depends on the
        order of its contrast rows.
        """
        n = len(self)
        return self.queue[:n] if n else None

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """The stored rows' labels ``[len]`` (None while empty or when the bank is unlabelled)."""
        n = len(self)
        return self.queue_labels[:n] if n and int(self.labelled) == 1 else None

    def ref_kwargs(self) -> dict:
        """``dict(ref_features=..., ref_labels=...)`` to pass to a loss (both None while empty)."""
        return {"ref_features": self.features, "ref_labels": self.labels}

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels=None, *, gather: bool = False, process_group=None) -> None:
        """Append ``features`` (detached) and ``labels``, dropping the oldest rows beyond ``capacity``.

        With ``gather=True`` under an initialised process group, the rows of every rank are
        appended (in rank order) on every rank, as MoCo does with its keys, so all ranks
        hold the same bank. If one rank's rows fail a check, every rank raises the same error
        and no bank changes.
        """
        info = group_rank_and_size(process_group) if gather else None
        try:
            flat, y, has_labels = self._checked(features, labels)
            error = None
        except (TypeError, ValueError) as exc:
            if info is None or info[1] == 1:
                raise
            flat = y = has_labels = None
            error = exc
        if info is not None and info[1] > 1:
            device = self.queue.device
            mine = [0, 0] if flat is None else [flat.shape[0], has_labels]
            table = exchange_checks(mine, error, process_group, info[1], device)
            sizes, labelled = table[:, 0].tolist(), table[:, 1].tolist()
            if len(set(labelled)) != 1:
                raise ValueError(f"labels must be given on every rank or on none, got labels by rank: {labelled}")
            flat, y = all_gather_rows(flat, sizes, process_group), all_gather_rows(y, sizes, process_group)
        self.labelled.fill_(has_labels)
        if flat.shape[0] > self.capacity:  # only the newest rows survive
            flat, y = flat[-self.capacity:], y[-self.capacity:]
        n = flat.shape[0]
        start = int(self.write_index)
        first = min(n, self.capacity - start)
        self.queue[start:start + first] = flat[:first]
        self.queue_labels[start:start + first] = y[:first]
        self.queue[: n - first] = flat[first:]  # wrap around to the front
        self.queue_labels[: n - first] = y[first:]
        self.write_index.fill_((start + n) % self.capacity)
        self.size.fill_(min(self.capacity, int(self.size) + n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse a saved state that no bank of this capacity can hold, before it is loaded
        (an oversized ``size`` would otherwise fail at the next read or push)."""
        def saved(name):
            value = state_dict.get(prefix + name)
            return None if value is None or value.numel() != 1 else int(value)

        size, index, labelled = saved("size"), saved("write_index"), saved("labelled")
        if size is not None and not 0 <= size <= self.capacity:
            raise ValueError(f"MemoryBank state: size must lie in [0, capacity = {self.capacity}], got {size}")
        if index is not None and not 0 <= index < self.capacity:
            raise ValueError(f"MemoryBank state: write_index must lie in [0, capacity = {self.capacity}), got {index}")
        if labelled is not None and labelled not in (-1, 0, 1):
            raise ValueError(f"MemoryBank state: labelled must be -1, 0 or 1, got {labelled}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _checked(self, features, labels):
        """``(rows [n, dim] in the bank's dtype and device, labels [n] (-1: unlabelled), 1 if labelled)``."""
        if isinstance(features, torch.Tensor) and features.dim() == 2 and labels is None:
            flat, y = features, None
        else:
            flat, y, _, _ = flatten_features(features, labels)
            if labels is None:
                y = None  # sample indices are no class labels: the rows stay unlabelled
        if flat.shape[1] != self.dim:
            raise ValueError(f"features have {flat.shape[1]} columns but the bank stores rows of size {self.dim}")
        has_labels = 1 if y is not None else 0
        if int(self.labelled) not in (-1, has_labels):
            raise ValueError(
                "this bank holds " + ("labelled" if has_labels == 0 else "unlabelled") + " rows; "
                + ("pass labels to push" if has_labels == 0 else "push without labels, or use a new bank")
            )
        flat = flat.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        if y is None:
            y = torch.full((flat.shape[0],), -1, dtype=torch.int64, device=flat.device)
        return flat, y.to(self.queue_labels.device), has_labels

    def reset(self) -> None:
        """Forget every stored row."""
        self.write_index.zero_()
        self.size.zero_()
        self.labelled.fill_(-1)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, dim={self.dim}, size={len(self)}, dtype={self.queue.dtype}"
