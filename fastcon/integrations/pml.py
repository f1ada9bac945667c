"""A drop-in for pytorch-metric-learning's ``losses.SupConLoss``.

Replace ``from pytorch_metric_learning.losses import SupConLoss`` by
``from fastcon.integrations.pml import SupConLoss``: the constructor, the call and the numbers
are pytorch-metric-learning's (PML below), computed by fastcon's blockwise backends instead of
PML's ``N x N`` similarity matrix and masks. PML itself is not needed to use it.

How PML's conventions map onto :func:`fastcon.functional.supcon_loss`:

- PML's logits are cosine similarities divided by ``temperature``, with no ``t / t_base``
  factor in front of the loss, so the adapter passes ``base_temperature=temperature``
  (fastcon's default ``base_temperature=0.07`` would scale PML's loss by ``temperature / 0.07``).
- PML L2-normalises the embeddings (``CosineSimilarity``); so does fastcon (``normalize=True``).
- PML averages the per-anchor losses that are above zero (``AvgNonZeroReducer``): an anchor
  without a positive has loss 0 and is left out, which is fastcon's ``reduction="mean"`` over the
  anchors that have a positive.
- PML returns 0 when the batch has no negative pair at all (a single class); fastcon would
  contrast the positives against each other, so the adapter returns 0 there too (with zero
  gradients, still connected to the graph, as PML's).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as FC
from ..backends import NAMES as BACKENDS
from ..inputs import check_choice
from ..losses import SupCon

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """pytorch-metric-learning's ``SupConLoss(temperature=0.1)``, computed by fastcon.

    ``loss_fn(embeddings, labels)`` with ``embeddings [N, D]`` and integer ``labels [N]``
    returns PML's loss: the supervised contrastive loss over cosine similarities divided by
    ``temperature``, averaged over the anchors that have a positive. The loss is float32
    (float64 for float64 embeddings), as fastcon's losses are.

    ``backend`` picks fastcon's backend (``"auto"``: the best available). PML's other
    constructor options (``distance``, ``reducer``, ``embedding_regularizer``, ...) are not
    supported: the adapter computes PML's defaults (cosine similarity, ``AvgNonZeroReducer``).
    PML's ``indices_tuple`` (mined pairs) and ``ref_emb`` / ``ref_labels`` (a separate
    reference set, as ``CrossBatchMemory`` passes) are refused with ``NotImplementedError``.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", **pml_options):
        super().__init__()
        if pml_options:
            names = ", ".join(sorted(pml_options))
            raise TypeError(
                f"fastcon.integrations.pml.SupConLoss computes PML's default distance (cosine similarity) and "
                f"reducer (AvgNonZeroReducer) only; unsupported argument(s): {names}"
            )
        self.temperature = temperature
        self.backend = check_choice("backend", backend, BACKENDS)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        # PML's loss has no t / t_base factor: base_temperature = temperature cancels it
        self._temperature = SupCon(value, value).temperature  # checked as fastcon's own losses are

    def forward(self, embeddings: torch.Tensor, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if ref_emb is not None:
            raise NotImplementedError(
                "ref_emb is not supported by fastcon.integrations.pml.SupConLoss: PML contrasts the query rows "
                "against the reference rows only, and fastcon's engines always include the batch rows in the "
                "contrast set; this needs anchor-only contrast against a separate key set (query and key sides), "
                "which fastcon does not have yet. Use PML's SupConLoss for ref_emb (and CrossBatchMemory)"
            )
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb")
        if indices_tuple is not None:
            raise NotImplementedError(
                "indices_tuple is not supported by fastcon.integrations.pml.SupConLoss: fastcon takes its "
                "positives and negatives from the labels (every same-label pair is a positive, every other pair "
                "a negative), not from mined index lists; pass labels only"
            )
        if labels is None:
            raise ValueError("labels is required: an integer tensor [N] of class indices, one per row of embeddings")
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a 2-D tensor [N, D] (batch_size, embedding_size), got {shape}")
        t = self.temperature
        loss = FC.supcon_loss(embeddings, labels, temperature=t, base_temperature=t, backend=self.backend)
        # PML returns 0 when no pair is negative (one class only); checked on the device, no host sync
        y = torch.as_tensor(labels, device=embeddings.device)
        has_negative = (y != y[:1]).any()
        return loss * has_negative.to(loss.dtype)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"
