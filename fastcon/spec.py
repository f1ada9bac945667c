"""The hyper-parameters of one loss, as every backend receives them."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_KINDS = ("supcon", "schane", "focal")


@dataclass(frozen=True)
class LossSpec:
    """Which loss of SPEC.md to compute, with its hyper-parameters.

    ``scale`` is ``t / t_base`` for SupCon and focal SupCon (1 for SCHaNe).
    ``beta`` is SCHaNe's hardness, ``gamma`` the focal exponent; unused ones are 0.
    """

    kind: str
    temperature: float
    scale: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {self.kind!r}")
