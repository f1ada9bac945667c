"""Fine-tuning harness: ``fastcon finetune``, ``fastcon compare`` and ``fastcon curve``.

Fine-tunes a timm model with cross-entropy or one of fastcon's contrastive recipes
(LaCViT's two-stage SupCon, SCHaNe, CLCE, Core-tuning) and reports accuracy and
embedding quality. Layout:

- :mod:`.config`: what a run trains on: the ``digits`` preset, or timm's own input size and
  normalisation for the model; the command-line errors (:class:`~.config.UsageError`);
- :mod:`.data`: data sets (scikit-learn's digits by default, ImageFolder, CIFAR);
- :mod:`.augment`: the two training views (``simclr`` or ``light``), test images, normalisation;
- :mod:`.models`: the timm backbone with classifier and projection heads, checkpoints;
- :mod:`.recipes`: one training step per loss;
- :mod:`.metrics`: accuracy, alignment, uniformity, isotropy;
- :mod:`.train`: the training loop (single process or torchrun/DDP) and its outputs;
- :mod:`.plots`: PNG plots; :mod:`.progress`: bars on a terminal, a line per epoch in logs;
  :mod:`.cli`: the sub-commands;
- :mod:`.curve`: ``fastcon curve``, every loss at several batch sizes against CE.

timm, torchvision, scikit-learn and matplotlib are imported inside functions so that
``fastcon --help`` works without them.
"""
