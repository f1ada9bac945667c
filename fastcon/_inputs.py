"""Validation of user input and the view-major flattening every backend shares.

Everything here is O(N * D) and runs before any similarity is computed, so a bad
argument is reported before heavy work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
CONTRAST_MODES = ("all", "one")
BACKENDS = ("auto", "reference", "blockwise", "triton", "native")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 input, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


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
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must hold integers (class indices), got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D with {expected} entries ({what}), got shape {tuple(labels.shape)}")
    if labels.shape[0] != expected:
        raise ValueError(f"{name} has {labels.shape[0]} entries but {what} is {expected}")
    return labels.to(device=device, dtype=torch.int64)


@dataclass
class Problem:
    """A validated, flattened contrastive problem.

    ``z`` holds the M batch rows (view-major, normalised, in the compute dtype) and
    the anchors are its first ``num_anchors`` rows; ``ref`` holds R extra contrast
    rows that are never anchors. Anchor ``i`` is contrast column ``i``.
    """

    z: torch.Tensor
    labels: torch.Tensor
    ref: Optional[torch.Tensor]
    ref_labels: Optional[torch.Tensor]
    num_anchors: int
    input_dtype: torch.dtype

    @property
    def num_contrast(self) -> int:
        return self.z.shape[0] + (0 if self.ref is None else self.ref.shape[0])


def flatten_features(features: torch.Tensor, labels, *, name="features", label_name="labels"):
    """``[B, V, D]`` or ``[N, D]`` -> ``([V*B, D] view-major, labels [V*B], B, V)``."""
    features = _check_features(name, features)
    if features.dim() == 3:
        b, v, d = features.shape
        if b == 0 or v == 0 or d == 0:
            raise ValueError(f"{name} must have non-zero sizes, got shape {tuple(features.shape)}")
        if labels is None:
            labels = torch.arange(b, device=features.device)
        else:
            labels = _check_labels(label_name, labels, b, features.device, f"the batch size B of {name} [B, V, D]")
        flat = features.transpose(0, 1).reshape(v * b, d)  # row v*B + b is view v of sample b
        return flat, labels.repeat(v), b, v
    if features.dim() == 2:
        n, d = features.shape
        if n == 0 or d == 0:
            raise ValueError(f"{name} must have non-zero sizes, got shape {tuple(features.shape)}")
        if labels is None:
            raise ValueError(
                f"{label_name} is required when {name} is [N, D]; pass [B, V, D] with several views "
                "for instance discrimination without labels"
            )
        labels = _check_labels(label_name, labels, n, features.device, f"the number of rows N of {name} [N, D]")
        return features, labels, n, 1
    raise ValueError(f"{name} must be [B, V, D] or [N, D], got {features.dim()}-D shape {tuple(features.shape)}")


def prepare(
    features: torch.Tensor,
    labels=None,
    *,
    contrast_mode: str = "all",
    normalize: bool = True,
    ref_features=None,
    ref_labels=None,
) -> Problem:
    """Validate, flatten view-major, cast to the compute dtype and L2-normalise.

    The cast and the normalisation stay in the autograd graph, so gradients reach
    ``features`` (and ``ref_features``) in their own dtype.
    """
    check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    flat, y, b, _ = flatten_features(features, labels)
    cdtype = compute_dtype(flat.dtype)
    z = flat.to(cdtype)
    if normalize:
        z = F.normalize(z, dim=1, eps=1e-12)
    ref = ref_y = None
    if ref_features is not None:
        _check_features("ref_features", ref_features)
        if ref_features.dim() == 3:
            if ref_labels is None:
                ref_labels = torch.full((ref_features.shape[0],), -1, dtype=torch.int64)
                ref_flat, _, _, _ = flatten_features(ref_features, ref_labels, name="ref_features")
                ref_y = None
            else:
                ref_flat, ref_y, _, _ = flatten_features(
                    ref_features, ref_labels, name="ref_features", label_name="ref_labels"
                )
        elif ref_features.dim() == 2:
            ref_flat = ref_features
            if ref_labels is not None:
                ref_y = _check_labels(
                    "ref_labels", ref_labels, ref_flat.shape[0], flat.device, "the number of rows of ref_features"
                )
        else:
            raise ValueError(
                f"ref_features must be [R, D] or [R, V, D], got {ref_features.dim()}-D shape {tuple(ref_features.shape)}"
            )
        if ref_flat.shape[-1] != flat.shape[-1]:
            raise ValueError(
                f"ref_features has feature size {ref_flat.shape[-1]} but features has {flat.shape[-1]}"
            )
        if ref_flat.device != flat.device:
            raise ValueError(f"ref_features is on {ref_flat.device} but features is on {flat.device}")
        ref = ref_flat.to(cdtype)
        if normalize:
            ref = F.normalize(ref, dim=1, eps=1e-12)
        if ref_y is None:
            # Unlabelled extra rows are negatives of every anchor: give them a label no anchor has.
            ref_y = torch.full((ref.shape[0],), int(y.max()) + 1, dtype=torch.int64, device=flat.device)
    elif ref_labels is not None:
        raise ValueError("ref_labels was given without ref_features")
    num_anchors = z.shape[0] if contrast_mode == "all" else b
    return Problem(z=z, labels=y, ref=ref, ref_labels=ref_y, num_anchors=num_anchors, input_dtype=flat.dtype)
