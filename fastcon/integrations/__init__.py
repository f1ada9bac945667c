"""Drop-in losses for the training frameworks users already have.

- :mod:`fastcon.integrations.pml`: ``SupConLoss`` with the interface and numbers of
  pytorch-metric-learning's ``losses.SupConLoss``.
- :mod:`fastcon.integrations.sentence_transformers`: ``SupConLoss`` with the loss interface of
  sentence-transformers (``SentenceTransformerTrainer(loss=...)``).

Each is imported on its own (``from fastcon.integrations.pml import SupConLoss``); this package
imports neither framework, and the adapters compute with fastcon's blockwise backends, never
with an ``N x N`` matrix.
"""
