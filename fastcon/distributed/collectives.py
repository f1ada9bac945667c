"""Collectives and the rank layout of the distributed losses.

Every call starts with one small all-gather of each rank's batch description (sizes, views,
feature size, dtype), the outcome of its argument checks and the arguments every rank must
pass alike (loss, hyper-parameters, ``gather``, ``reduction``, ``backend``, ...), so that every
rank sees the same table before any other collective: a rank whose checks failed, or ranks
that disagree, make every rank raise the same error, and a rank with an empty batch takes
part with no rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from ..backends import NAMES as BACKEND_NAMES
from ..inputs import CONTRAST_MODES, FLOAT_DTYPES, REDUCTIONS
from ..losses import DEFINITIONS


def group_rank_and_size(process_group=None):
    """``(rank, world_size)`` in ``process_group``, or None when no process group is initialised.

    Without an initialised group the losses run as a world of one process, so the same
    training script works with and without ``torchrun``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group was given but torch.distributed is not initialised")
        return None
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], process_group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rank r holds ``sizes[r]`` rows) along dim 0, without autograd.

    Rows are padded to the largest rank so ranks may hold different numbers of rows (0 included).
    """
    longest = max(max(sizes), 1)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=process_group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _AllGatherRows(torch.autograd.Function):
    """:func:`all_gather_rows` whose backward returns to each rank the sum, over all ranks,
    of the gradients of its own rows (an all-reduce of the padded gradient: gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, process_group):
        ctx.sizes, ctx.rank, ctx.process_group = sizes, rank, process_group
        return all_gather_rows(x.detach(), sizes, process_group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, ctx.rank
        padded = grad.new_zeros((len(sizes), max(max(sizes), 1)) + tuple(grad.shape[1:]))
        for q, part in enumerate(torch.split(grad, list(sizes), dim=0)):
            padded[q, : sizes[q]] = part
        dist.all_reduce(padded, group=ctx.process_group)
        return padded[rank, : sizes[rank]], None, None, None


def all_gather_rows_with_grad(x: torch.Tensor, sizes: Sequence[int], process_group=None) -> torch.Tensor:
    """:func:`all_gather_rows` through which gradients flow back to the rank owning each row."""
    rank = dist.get_rank(process_group)
    return _AllGatherRows.apply(x, tuple(sizes), rank, process_group)


def all_reduce_sum(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum of ``x`` over ranks (a copy, outside autograd)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=process_group)
    return x


@dataclass
class RankLayout:
    """Where this rank's rows sit in the concatenated batch (rank order), and every rank's labels."""

    rank: int
    world: int
    row_counts: list  # flattened rows of every rank
    sample_counts: list  # samples of every rank
    all_labels: torch.Tensor  # [sum(row_counts)] labels of every rank's rows

    @property
    def start(self) -> int:
        return sum(self.row_counts[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.row_counts[self.rank]


_DTYPE_CODES = {dt: i for i, dt in enumerate(FLOAT_DTYPES)}
_SHAPE_FIELDS = ("samples", "rows", "views", "dim", "ndim", "dtype")
_ERROR_KINDS = (RuntimeError, TypeError, ValueError)  # the type every rank raises for a rank's failed check
MAX_HYPER = 6  # hyper-parameter slots of the metadata (focal SupCon has 3, CLCE 3)


@dataclass(frozen=True)
class RankArguments:
    """The arguments of a loss call that every rank must pass alike. Each is a choice among
    ``CHOICES`` (sent as its index) or a hyper-parameter (sent as its float64 bits)."""

    loss: str  # the definition's name, or the caller's loss that adds its own terms ("clce")
    hyper: tuple  # ((name, value), ...): the definition's hyper-parameters, then the caller's (CLCE's alpha)
    gather: object
    reduction: str
    backend: str
    contrast_mode: str
    normalize: bool
    labelled: bool

    CHOICES = {
        "loss": tuple(DEFINITIONS) + ("clce",),
        "gather": (True, "ring"),
        "reduction": REDUCTIONS,
        "backend": BACKEND_NAMES,
        "contrast_mode": CONTRAST_MODES,
        "normalize": (False, True),
        "labelled": (False, True),
    }
    WHAT = {"loss": "loss", "labelled": "labels given or not"}  # how an error names a choice

    @classmethod
    def of(cls, definition, extra_hyper, name=None, **choices):
        """From a call's definition (None when it could not be built), the caller's own
        hyper-parameters and loss name and the choices; unchecked values are sent as unknown (-1)."""
        hyper = () if definition is None else tuple((f.name, getattr(definition, f.name)) for f in fields(definition))
        return cls(loss=name or getattr(definition, "name", "?"), hyper=hyper + tuple(extra_hyper),
                   **dict(choices, normalize=bool(choices["normalize"]), labelled=bool(choices["labelled"])))

    def codes(self) -> list:
        out = [_index(getattr(self, name), options) for name, options in self.CHOICES.items()]
        values = torch.tensor([v for _, v in self.hyper] + [0.0] * (MAX_HYPER - len(self.hyper)),
                              dtype=torch.float64)
        return out + [len(self.hyper)] + values.view(torch.int64).tolist()

    def check_agreement(self, table: torch.Tensor) -> None:
        """Raise the same ValueError on every rank if the ranks' codes (``table [world, n]``,
        from :meth:`codes`) differ."""
        for k, (name, options) in enumerate(self.CHOICES.items()):
            got = table[:, k].tolist()
            if len(set(got)) != 1:
                shown = [options[c] if c >= 0 else "?" for c in got]
                raise ValueError(f"{self.WHAT.get(name, name)} must be the same on every rank, got {shown} by rank")
        if len(set(table[:, len(self.CHOICES)].tolist())) != 1:  # only a new loss left out of CHOICES gets here
            raise ValueError(f"every rank must call the same loss, got {table[:, len(self.CHOICES)].tolist()} "
                             "hyper-parameters by rank")
        bits = table[:, len(self.CHOICES) + 1:].contiguous()
        values = bits.view(torch.float64)
        for k, (name, _) in enumerate(self.hyper):
            if len(set(bits[:, k].tolist())) != 1:
                raise ValueError(f"{name} must be the same on every rank, got {values[:, k].tolist()} by rank")


def _index(value, options) -> int:
    """The position of ``value`` in ``options`` (bools and strings never equal each other), or -1."""
    for i, option in enumerate(options):
        if type(option) is type(value) and option == value:
            return i
    return -1


def exchange_checks(values: list, error, process_group, world: int, device) -> torch.Tensor:
    """All-gather each rank's ``values`` (ints) with the outcome of its checks (``error`` None
    when they passed): ``[world, len(values)]`` on the CPU.

    If a rank's checks failed, every rank raises the same error, which names that rank and
    carries its message (a second all-gather brings the message; the failing rank chains its
    own exception), so that no rank is left waiting in a collective the others never reach.
    """
    message = b"" if error is None else str(error).encode()
    kind = 0 if error is None else next((i for i, k in enumerate(_ERROR_KINDS) if isinstance(error, k)), 0)
    mine = torch.tensor([int(error is None), kind, len(message)] + list(values), dtype=torch.int64, device=device)
    table = all_gather_rows(mine[None], [1] * world, process_group).cpu()
    ok, kinds, lengths = (table[:, k].tolist() for k in range(3))
    bad = [r for r, flag in enumerate(ok) if not flag]
    if bad:
        text = torch.tensor(list(message), dtype=torch.uint8, device=device)
        texts = all_gather_rows(text, lengths, process_group).cpu()
        first = bad[0]
        start = sum(lengths[:first])
        reason = bytes(texts[start:start + lengths[first]].tolist()).decode(errors="replace")
        others = f" (and on rank(s) {bad[1:]})" if len(bad) > 1 else ""
        raise _ERROR_KINDS[kinds[first]](f"rank {first}: {reason}{others}") from error
    return table[:, 3:]


def describe_ranks(features, batch, error, arguments: RankArguments, process_group, world: int, device):
    """All-gather each rank's batch description, the outcome of its checks and its
    ``arguments``, and check that the ranks agree: the first collective of a loss call.

    ``batch`` is this rank's validated batch (None when its checks raised ``error``). If any
    rank's checks failed, every rank raises that error (:func:`exchange_checks`); ranks that
    disagree all raise the same ValueError.
    """
    ok = error is None
    shape = tuple(features.shape) if ok else ()
    mine = [
        shape[0] if ok else 0,
        batch.num_rows if ok else 0,
        shape[1] if ok and len(shape) == 3 else 0,
        shape[-1] if ok else 0,
        len(shape),
        _DTYPE_CODES.get(features.dtype, -1) if ok else -1,
    ]
    table = exchange_checks(mine + arguments.codes(), error, process_group, world, device)
    cols = {name: table[:, i].tolist() for i, name in enumerate(_SHAPE_FIELDS)}
    for name, what in (("ndim", "number of dimensions"), ("views", "number of views V"), ("dim", "feature size D")):
        if len(set(cols[name])) != 1:
            raise ValueError(f"features must have the same {what} on every rank, got {cols[name]} by rank")
    if len(set(cols["dtype"])) != 1:
        names = [str(FLOAT_DTYPES[c]).replace("torch.", "") for c in cols["dtype"]]
        raise ValueError(f"features must have the same dtype on every rank, got {names} by rank")
    arguments.check_agreement(table[:, len(_SHAPE_FIELDS):])
    return cols
