"""Validation of user input and the view-major flattening every backend shares.

Everything here is O(N * D) and runs before any similarity is computed, so a bad
argument is reported before heavy work starts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
CONTRAST_MODES = ("all", "one")


def check_real(name: str, value) -> float:
    """``value`` as a float: any real number (``int``, ``float``, ``numpy.float32``,
    ``fractions.Fraction``, ...) but not a bool or a tensor (a tensor hyper-parameter would
    be read on the host at every call)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    value = check_real(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    value = check_real(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_nonnegative(name: str, value: float) -> float:
    value = check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_unit_interval(name: str, value: float) -> float:
    value = check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_features(name: str, features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {features.dtype}"
        )
    return features


def _check_labels(name: str, labels, expected: int, device: torch.device, what: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(f"{name} must be an integer tensor, got {type(labels).__name__}") from exc
    if labels.is_meta and device.type != "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values; pass them on {device}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integers (class indices), got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D with {expected} entries ({what}), got shape {tuple(labels.shape)}")
    if labels.shape[0] != expected:
        raise ValueError(f"{name} has {labels.shape[0]} entries but {what} is {expected}")
    return labels.to(device=device, dtype=torch.int64)


def flatten_features(features: torch.Tensor, labels, *, name="features", label_name="labels", rows=True,
                     allow_empty=False, repeat=True):
    """``[B, V, D]`` or ``[N, D]`` -> ``([V*B, D] view-major (None unless rows), labels [V*B], B, V)``
    (``repeat=False``: the labels of the B samples, not repeated per view)."""
    features = _check_features(name, features)
    if features.dim() == 3:
        b, v, d = features.shape
        if (b == 0 and not allow_empty) or v == 0 or d == 0:
            raise ValueError(f"{name} must have non-zero sizes, got shape {tuple(features.shape)}")
        if labels is None:
            labels = torch.arange(b, device=features.device)
        else:
            labels = _check_labels(label_name, labels, b, features.device, f"the batch size B of {name} [B, V, D]")
        flat = flatten_rows(features) if rows else None  # row v*B + b is view v of sample b
        return flat, (torch.cat([labels] * v) if repeat and v > 1 else labels), b, v
    if features.dim() == 2:
        n, d = features.shape
        if (n == 0 and not allow_empty) or d == 0:
            raise ValueError(f"{name} must have non-zero sizes, got shape {tuple(features.shape)}")
        if labels is None:
            raise ValueError(
                f"{label_name} is required when {name} is [N, D]; pass [B, V, D] with several views "
                "for instance discrimination without labels"
            )
        labels = _check_labels(label_name, labels, n, features.device, f"the number of rows N of {name} [N, D]")
        return features, labels, n, 1
    raise ValueError(f"{name} must be [B, V, D] or [N, D], got {features.dim()}-D shape {tuple(features.shape)}")


@dataclass
class Batch:
    """A validated batch as the backends receive it.

    ``features`` is the user's tensor (``[B, V, D]`` or ``[N, D]``, any float dtype); its rows
    flattened view-major are the M batch rows (row ``v*B + b`` is view v of sample b) and
    ``labels [M]`` their labels. ``ref [R, D]`` are the extra contrast rows and ``ref_labels``
    the labels of its first ``L <= R`` rows (None: ``L = 0``); the other ``R - L`` rows are
    unlabelled, negatives of every anchor, which the backends give a class of their own (no
    label value is reserved for them, so every int64 label is a user's). The anchors are the
    first ``num_anchors`` batch rows.
    """

    features: torch.Tensor
    labels: torch.Tensor
    ref: Optional[torch.Tensor]
    ref_labels: Optional[torch.Tensor]
    num_anchors: int

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    @property
    def num_unlabelled(self) -> int:
        """How many ref rows (the last ones) have no label."""
        if self.ref is None:
            return 0
        return self.ref.shape[0] - (0 if self.ref_labels is None else self.ref_labels.shape[0])

    @property
    def rows(self) -> torch.Tensor:
        """The batch rows ``[M, D]``, view-major (a copy for ``[B, V, D]`` input)."""
        return flatten_rows(self.features)


def flatten_rows(features: torch.Tensor) -> torch.Tensor:
    """``[B, V, D]`` -> ``[V*B, D]`` view-major; ``[N, D]`` unchanged."""
    if features.dim() == 3:
        return features.transpose(0, 1).reshape(-1, features.shape[-1])
    return features


def unflatten_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flatten_rows` for a tensor shaped like ``like``."""
    if like.dim() == 3:
        b, v, d = like.shape
        return rows.reshape(v, b, d).transpose(0, 1).contiguous()
    return rows


def check_batch(
    features: torch.Tensor,
    labels=None,
    *,
    contrast_mode: str = "all",
    ref_features=None,
    ref_labels=None,
    allow_empty: bool = False,
) -> Batch:
    """Validate the arguments of a loss and describe the batch; O(N) work, no copy of the features.
    ``allow_empty``: a batch of no samples is valid (a rank's share of a distributed batch)."""
    check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    features = _check_features("features", features)
    _, y, b, v = flatten_features(features, labels, rows=False, allow_empty=allow_empty, repeat=False)
    ref = ref_y = None
    if ref_features is not None:
        _check_features("ref_features", ref_features)
        if ref_features.dim() == 3:
            given = ref_labels if ref_labels is not None else torch.zeros(ref_features.shape[0], dtype=torch.int64)
            ref, ref_y, _, _ = flatten_features(ref_features, given, name="ref_features", label_name="ref_labels")
            if ref_labels is None:
                ref_y = None
        elif ref_features.dim() == 2:
            ref = ref_features
            if ref.shape[0] == 0:
                raise ValueError("ref_features must have at least one row")
            if ref_labels is not None:
                ref_y = _check_labels("ref_labels", ref_labels, ref.shape[0], features.device,
                                      "the number of rows of ref_features")
        else:
            raise ValueError(
                f"ref_features must be [R, D] or [R, V, D], got {ref_features.dim()}-D shape {tuple(ref_features.shape)}"
            )
        if ref.shape[-1] != features.shape[-1]:
            raise ValueError(f"ref_features has feature size {ref.shape[-1]} but features has {features.shape[-1]}")
        if ref.device != features.device:
            raise ValueError(f"ref_features is on {ref.device} but features is on {features.device}")
    elif ref_labels is not None:
        raise ValueError("ref_labels was given without ref_features")
    m = b * v
    if ref_y is not None:  # one tensor, the batch rows' labels and the ref rows' as two views of it
        joined = torch.cat([y] * v + [ref_y])
        y, ref_y = joined[:m], joined[m:]
    elif v > 1:
        y = torch.cat([y] * v)  # one copy per view (a cat costs less host time than repeat)
    num_anchors = m if contrast_mode == "all" else b
    return Batch(features, y, ref, ref_y, num_anchors)
