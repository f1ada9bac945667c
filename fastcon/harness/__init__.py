"""Fine-tuning harness: ``fastcon finetune``, ``fastcon compare`` and ``fastcon curve``.

Fine-tunes a timm model with cross-entropy or one of fastcon's contrastive recipes
(LaCViT's two-stage SupCon, SCHaNe, CLCE, Core-tuning) and reports accuracy and
embedding quality. Layout:

- :mod:`.data`: data sets (scikit-learn's digits by default, ImageFolder, CIFAR) and the
  batch augmentation that makes the two views;
- :mod:`.models`: the timm backbone with classifier and projection heads, checkpoints;
- :mod:`.recipes`: one training step per loss;
- :mod:`.metrics`: accuracy, alignment, uniformity, isotropy;
- :mod:`.train`: the training loop (single process or torchrun/DDP) and its outputs;
- :mod:`.plots`: PNG plots; :mod:`.cli`: the sub-commands;
- :mod:`.curve`: ``fastcon curve``, every loss at several batch sizes against CE.

timm, torchvision, scikit-learn and matplotlib are imported inside functions so that
``fastcon --help`` works without them.
"""
