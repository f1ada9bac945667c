"""Data sets: scikit-learn's digits (bundled), ImageFolder directories, CIFAR pickles.

In-memory data sets (digits, CIFAR) yield ``(image, label)`` with ``image`` a float tensor
``[C, H, W]`` in ``[0, 1]``; an ImageFolder yields PIL images, so that the training views are
cut from the full-size photo. How images become model inputs (augmentation, resizing,
normalisation) is :mod:`.augment`'s business.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy
import torch
from torch.utils.data import Dataset

from .config import UsageError

DATASET_HELP = (
    "'digits' (scikit-learn's bundled 8x8 handwritten digits, no download), 'imagefolder=DIR' "
    "(torchvision ImageFolder layout: DIR/train and DIR/test (or DIR/val) with one folder per class, "
    "or DIR with one folder per class, of which 20%% is held out), 'cifar10=DIR' or 'cifar100=DIR' "
    "(the python-pickle batches as distributed: data_batch_1..5 + test_batch, or train + test)"
)


class DatasetError(UsageError):
    """A data set argument that does not name usable data; the message says what was expected."""


@dataclass
class ImageData:
    train: Dataset
    test: Dataset
    num_classes: int
    name: str
    hflip: bool  # whether a horizontal flip preserves the label (not for digits)
    files: bool = False  # items are PIL images read from files (ImageFolder), not tensors


class TensorImages(Dataset):
    """Images held in memory: ``uint8`` (0..255) or float in [0, 1], ``[N, C, H, W]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        image = self.images[index]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        return image, int(self.labels[index])


def load_dataset(spec: str, *, seed: int = 0) -> ImageData:
    """The data set named by ``spec`` (see ``DATASET_HELP``)."""
    kind, _, path = spec.partition("=")
    kind = kind.strip().lower()
    if kind == "digits":
        if path:
            raise DatasetError("--dataset digits takes no path (the digits ship with scikit-learn)")
        return load_digits()
    if kind in ("imagefolder", "cifar10", "cifar100"):
        if not path:
            raise DatasetError(f"--dataset {kind} needs a directory: --dataset {kind}=DIR")
        if not os.path.isdir(path):
            raise DatasetError(f"--dataset {kind}={path}: no such directory")
        if kind == "imagefolder":
            return load_imagefolder(path, seed=seed)
        return load_cifar(path, num_classes=10 if kind == "cifar10" else 100)
    raise DatasetError(f"unknown --dataset {spec!r}; expected {DATASET_HELP.replace('%%', '%')}")


def load_digits() -> ImageData:
    """scikit-learn's 1797 8x8 digits (grey levels 0..16), a fixed stratified 75/25 split.

    The split does not depend on ``--seed`` so that runs with different seeds are
    evaluated on the same held-out images.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, stratify=labels.numpy(), random_state=0
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return ImageData(
        TensorImages(images[train_idx], labels[train_idx]),
        TensorImages(images[test_idx], labels[test_idx]),
        num_classes=10, name="digits", hflip=False,
    )


def _cifar_files(root: str, num_classes: int):
    """The (train files, test file) under ``root`` or its standard extracted sub-folder."""
    if num_classes == 10:
        train_names, test_name, sub = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "cifar-10-batches-py"
    else:
        train_names, test_name, sub = ["train"], "test", "cifar-100-python"
    for folder in (root, os.path.join(root, sub)):
        if all(os.path.isfile(os.path.join(folder, n)) for n in train_names + [test_name]):
            return [os.path.join(folder, n) for n in train_names], os.path.join(folder, test_name)
    raise DatasetError(
        f"--dataset cifar{num_classes}={root}: expected the python-pickle batches "
        f"{', '.join(train_names)} and {test_name} in {root} or {os.path.join(root, sub)}"
    )


def _read_cifar_batch(path: str, label_key: bytes, num_classes: int):
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # a truncated or foreign file can raise almost anything in pickle
        raise DatasetError(f"{path}: not a CIFAR python-pickle batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: expected a pickled dict with keys b'data' and {label_key!r}")
    data = torch.as_tensor(numpy.asarray(batch[b"data"]))
    labels = torch.as_tensor(list(batch[label_key]), dtype=torch.long)
    if data.dim() != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{path}: expected b'data' of shape [N, 3072] and N labels, got {tuple(data.shape)} "
            f"and {labels.shape[0]} labels"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return data.to(torch.uint8).view(-1, 3, 32, 32), labels


def load_cifar(root: str, *, num_classes: int) -> ImageData:
    train_files, test_file = _cifar_files(root, num_classes)
    label_key = b"labels" if num_classes == 10 else b"fine_labels"
    parts = [_read_cifar_batch(p, label_key, num_classes) for p in train_files]
    train = TensorImages(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = TensorImages(*_read_cifar_batch(test_file, label_key, num_classes))
    return ImageData(train, test, num_classes=num_classes, name=f"cifar{num_classes}", hflip=True)


def load_imagefolder(root: str, *, seed: int) -> ImageData:
    from torchvision import datasets

    def folder(path):
        try:
            ds = datasets.ImageFolder(path, loader=_rgb_loader)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetError(
                f"--dataset imagefolder={root}: {path} is not in ImageFolder layout "
                f"(one sub-folder per class, holding image files): {exc}"
            ) from exc
        if len(ds.classes) < 2:
            raise DatasetError(f"--dataset imagefolder={root}: {path} has {len(ds.classes)} class folder(s), need 2+")
        return ds

    test_dir = next((os.path.join(root, n) for n in ("test", "val") if os.path.isdir(os.path.join(root, n))), None)
    if os.path.isdir(os.path.join(root, "train")) and test_dir is not None:
        train, test = folder(os.path.join(root, "train")), folder(test_dir)
        if train.classes != test.classes:
            raise DatasetError(
                f"--dataset imagefolder={root}: train and {os.path.basename(test_dir)} have different "
                f"class folders ({train.classes} vs {test.classes})"
            )
        return ImageData(train, test, num_classes=len(train.classes), name=f"imagefolder:{root}", hflip=True,
                         files=True)
    full = folder(root)
    targets = torch.tensor(full.targets)
    generator = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(len(full.classes)):  # hold out 20% of every class
        members = torch.nonzero(targets == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_idx.append(members[: len(members) // 5])
    test_idx = torch.cat(test_idx)
    is_test = torch.zeros(len(targets), dtype=torch.bool)
    is_test[test_idx] = True
    from torch.utils.data import Subset

    train = Subset(full, torch.nonzero(~is_test).flatten().tolist())
    test = Subset(full, torch.nonzero(is_test).flatten().tolist())
    if len(test) == 0:
        raise DatasetError(f"--dataset imagefolder={root}: too few images to hold out a test split")
    return ImageData(train, test, num_classes=len(full.classes), name=f"imagefolder:{root}", hflip=True, files=True)


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
