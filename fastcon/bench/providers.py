"""Who computes the loss in the benchmark: fastcon's backends and the codes users have today.

A provider turns a loss name into a callable ``loss_fn(features [B, V, D], labels [B],
logits [B, V, C] | None) -> scalar``. Every provider sees the same raw (unnormalised)
features and normalises them inside the timed call, as training does: fastcon and
pytorch-metric-learning normalise internally, SupContrast's models normalise their
projection output before the loss, so its provider does that first.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

LOSSES = ("supcon", "schane", "focal", "clce")
TAKES_LOGITS = frozenset(LOSSES[3:])  # losses whose call also takes classifier logits (CLCE)
SUPCON_ONLY = LOSSES[:1]  # the published codes benchmarked beside fastcon implement SupCon only

# fastcon's engines; each joins the benchmark when fastcon can run it on the device
FASTCON_BACKENDS = ("native", "triton", "blockwise")


@dataclass(frozen=True)
class Provider:
    name: str
    losses: tuple[str, ...]
    build: Callable[[str], Callable]  # loss name -> loss_fn
    is_fastcon: bool = False  # a fast fastcon backend (not the dense reference)


# loss name -> how the benchmark calls fastcon's functional API on (features, labels, logits)
_FASTCON_CALLS = {
    "supcon": lambda FC, backend: lambda f, y, logits: FC.supcon_loss(f, y, backend=backend),
    "schane": lambda FC, backend: lambda f, y, logits: FC.schane_loss(f, y, backend=backend),
    "focal": lambda FC, backend: lambda f, y, logits: FC.focal_supcon_loss(f, y, backend=backend),
    "clce": lambda FC, backend: lambda f, y, logits: FC.clce_loss(f, logits, y, backend=backend),
}


def _fastcon_builder(backend: str):
    def build(loss: str):
        import fastcon.functional as FC

        if loss not in _FASTCON_CALLS:
            raise ValueError(f"unknown loss {loss!r}")
        return _FASTCON_CALLS[loss](FC, backend)

    return build


def _check_supcon_only(loss: str, who: str) -> None:
    if loss not in SUPCON_ONLY:
        raise ValueError(f"{who} is benchmarked on SupCon only, not {loss!r}")


def _supcontrast_builder(loss: str):
    import torch.nn.functional as F

    from .supcontrast import supcontrast_loss

    _check_supcon_only(loss, "the SupContrast code")
    return lambda f, y, logits: supcontrast_loss(F.normalize(f, dim=-1), y)


def _pml_builder(loss: str):
    from pytorch_metric_learning.losses import SupConLoss

    _check_supcon_only(loss, "pytorch-metric-learning")
    loss_module = SupConLoss(temperature=0.07)

    def loss_fn(f, y, logits):
        # [B, V, D] -> [V*B, D] view-major, labels repeated per view; its cosine distance normalises
        views = f.shape[1]
        return loss_module(f.transpose(0, 1).reshape(-1, f.shape[-1]), y.repeat(views))

    return loss_fn


def _backend_usable(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether the registry can run ``backend`` on ``device`` (never the Triton interpreter)."""
    from fastcon.backends import REGISTRY

    entry = REGISTRY[backend]
    if not entry.runs_on(device):
        return False, f"{backend} runs on {' or '.join(entry.devices)} only"
    why = entry.unavailable_reason()
    return (why is None), (why or "")


def available_providers(device: torch.device):
    """``(providers, skipped)``: the providers runnable on ``device``, and ``(name, why)`` for the rest."""
    device = torch.device(device)
    providers, skipped = [], []
    for backend in FASTCON_BACKENDS:
        ok, why = _backend_usable(backend, device)
        if ok:
            providers.append(Provider(f"fastcon-{backend}", LOSSES, _fastcon_builder(backend), is_fastcon=True))
        else:
            skipped.append((f"fastcon-{backend}", why))
    providers.append(Provider("reference", LOSSES, _fastcon_builder("reference")))
    providers.append(Provider("supcontrast", ("supcon",), _supcontrast_builder))
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        skipped.append(("pytorch-metric-learning",
                        "not installed (pip install pytorch-metric-learning, or fastcon[bench])"))
    else:
        providers.append(Provider("pytorch-metric-learning", ("supcon",), _pml_builder))
    return providers, skipped


def get_provider(name: str, device: torch.device) -> Provider:
    providers, skipped = available_providers(device)
    for p in providers:
        if p.name == name:
            return p
    why = dict(skipped).get(name)
    if why is not None:
        raise RuntimeError(f"provider {name!r} is not available on {device}: {why}")
    raise ValueError(f"unknown provider {name!r}")
