"""fastcon's SupCon as a sentence-transformers loss.

``SupConLoss(model)`` has the loss interface of sentence-transformers
(``forward(sentence_features, labels)``), so it goes wherever one of its losses goes::

    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from fastcon.integrations.sentence_transformers import SupConLoss

    args = SentenceTransformerTrainingArguments(output_dir, batch_sampler=BatchSamplers.GROUP_BY_LABEL)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,  # columns: text(s), "label"
                                         loss=SupConLoss(model, temperature=0.1))

Each text column of the dataset is one view of the sample: the model embeds every column,
the embeddings are stacked as ``[B, V, D]`` (column ``v`` is view ``v``) and the loss is
:func:`fastcon.functional.supcon_loss` of them. With a ``label`` column the positives of a row
are every other view of a row with its label (``GROUP_BY_LABEL`` makes sure a batch holds
several rows per label); without one, a dataset of two or more columns (e.g. ``(anchor,
positive)`` pairs) is instance discrimination: the positives of a text are the other columns
of its own row. sentence-transformers is not imported by this module.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import modules

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """fastcon's supervised contrastive loss of a SentenceTransformer's embeddings.

    ``model``: the SentenceTransformer being trained (kept as ``self.model``, which the
    trainer replaces by its wrapped model). ``temperature``, ``base_temperature``,
    ``contrast_mode``, ``normalize`` and ``backend`` are :class:`fastcon.SupConLoss`'s.
    ``gather=True`` (with ``process_group``) makes every rank's anchors contrast against the
    embeddings of all ranks under distributed training, the loss scaled for DDP's gradient
    averaging (see :func:`fastcon.functional.supcon_loss`).
    """

    def __init__(self, model: nn.Module, temperature: float = 0.07, base_temperature: float = 0.07, *,
                 contrast_mode: str = "all", normalize: bool = True, backend: str = "auto", gather=False,
                 process_group=None):
        super().__init__()
        self.model = model
        self.supcon = modules.SupConLoss(temperature, base_temperature, contrast_mode=contrast_mode,
                                         normalize=normalize, backend=backend, gather=gather,
                                         process_group=process_group)

    def forward(self, sentence_features, labels) -> torch.Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings, labels) -> torch.Tensor:
        """The loss of one ``[B, D]`` embedding per text column (the columns are the views)."""
        return self.supcon(torch.stack(list(embeddings), dim=1), labels)

    def get_config_dict(self) -> dict:
        """The hyper-parameters sentence-transformers writes into the model card."""
        supcon = self.supcon
        return {"temperature": supcon.temperature, "base_temperature": supcon.base_temperature,
                "contrast_mode": supcon.contrast_mode, "gather": supcon.gather}

    @property
    def citation(self) -> str:
        return """
@inproceedings{khosla2020supervised,
    title={Supervised Contrastive Learning},
    author={Khosla, Prannay and Teterwak, Piotr and Wang, Chen and Sarna, Aaron and Tian, Yonglong and
            Isola, Phillip and Maschinot, Aaron and Liu, Ce and Krishnan, Dilip},
    booktitle={Advances in Neural Information Processing Systems},
    year={2020}
}
"""
