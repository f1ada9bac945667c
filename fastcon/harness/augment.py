"""How a run turns a data set's images into model inputs: the two training views, the test
images and the normalisation.

Two augmentations (``--augment``):

- ``simclr``: the SupCon paper's (and SimCLR's) views, made per image by torchvision in the
  data loader from the full-size image: ``RandomResizedCrop(scale=(0.2, 1))``, a horizontal
  flip (where it keeps the label), ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p = 0.8 and
  ``RandomGrayscale`` with p = 0.2;
- ``light``: one small random rotation, scaling and shift (and flip) per image, applied to
  whole batches on the training device with one ``grid_sample`` (what the ``digits`` preset
  uses: the 8x8 digits do not survive a 20% crop).

The two views of a contrastive step come from two *independent* random augmentations of the
same image. (The SCHaNe reference code feeds the same crop twice; fastcon does not.)

Test images are resized to the input size (files: timm's evaluation transform, the shorter
side to ``img_size / crop_pct`` then a centre crop) and normalised with the model's mean and
standard deviation (timm's ``pretrained_cfg``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import RunConfig
from .data import ImageData


# ----------------------------------------------------------------------------- batches on the device

def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def model_input(images: torch.Tensor, img_size: int, *, mean, std, augment: bool = False, hflip: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch in [0, 1] -> the model's input: 3 channels, ``img_size`` square, normalised with
    ``mean`` and ``std``; with ``augment``, the light augmentation (independently per image)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if augment:
        images = random_affine(images, img_size, hflip=hflip, generator=generator)
    elif images.shape[-2:] != (img_size, img_size):
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False,
                               antialias=images.shape[-1] > img_size)
    return normalize(images, mean, std)


def random_affine(images: torch.Tensor, img_size: int, *, hflip: bool, generator=None,
                  degrees: float = 10.0, scale: float = 0.1, translate: float = 0.12) -> torch.Tensor:
    """One random rotation, scaling, translation (and flip when ``hflip``) per image, resampled
    straight to ``img_size`` with one ``grid_sample`` (so upsampling costs nothing extra)."""
    n, device = images.shape[0], images.device

    def uniform(*shape):
        return torch.rand(*shape, generator=generator).to(device) * 2 - 1

    angle = uniform(n) * math.radians(degrees)
    zoom = 1 + uniform(n) * scale
    shift = uniform(2, n) * translate
    flip = torch.ones(n, device=device)
    if hflip:
        flip = torch.where(torch.rand(n, generator=generator).to(device) < 0.5, -flip, flip)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[0]], 1),
        torch.stack([sin * flip, cos, shift[1]], 1),
    ], 1).to(images.dtype)
    grid = F.affine_grid(theta, [n, images.shape[1], img_size, img_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- per-image transforms

def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "nearest": InterpolationMode.NEAREST,
            "lanczos": InterpolationMode.LANCZOS}.get(name, InterpolationMode.BILINEAR)


def _three_channels(image):
    """Grey tensors (the digits) -> 3 channels, so that colour jitter and grey-scaling apply."""
    if isinstance(image, torch.Tensor) and image.shape[-3] == 1:
        return image.expand(3, -1, -1)
    return image


def _unit_range(image: torch.Tensor) -> torch.Tensor:
    return image.as_subclass(torch.Tensor).clamp(0, 1)  # bicubic resampling overshoots a little


def simclr_transform(img_size: int, *, hflip: bool, interpolation: str = "bilinear"):
    """One random view, as in SupContrast's ``main_supcon.py``: a PIL image or a ``[C, H, W]``
    float tensor in [0, 1] -> a float tensor ``[3, img_size, img_size]`` in [0, 1]."""
    from torchvision.transforms import v2

    steps = [v2.Lambda(_three_channels),
             v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=_interpolation(interpolation),
                                  antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
              v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Lambda(_unit_range)]
    return v2.Compose(steps)


def eval_transform(img_size: int, *, crop_pct: float = 1.0, interpolation: str = "bilinear"):
    """timm's evaluation transform of a PIL image: the shorter side to ``img_size / crop_pct``,
    a centre crop of ``img_size``, a float tensor in [0, 1]."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(int(math.floor(img_size / crop_pct)), interpolation=_interpolation(interpolation),
                                 antialias=True),
                       v2.CenterCrop(img_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Lambda(_unit_range)])


def light_load_transform(img_size: int):
    """Files for the light augmentation: read at a little more than the input size, so that
    batches stack and the random affine then works on the batch."""
    from torchvision.transforms import v2

    load_size = max(img_size, int(round(img_size * 1.15)))
    return v2.Compose([v2.Resize((load_size, load_size), antialias=True), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Lambda(_unit_range)])


class Mapped(Dataset):
    """``(transform(image), label)`` of a data set's items."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        return self.transform(image), label


class TwoViews(Mapped):
    """``([2, C, H, W], label)``: two independent random views of each image."""

    def __getitem__(self, index):
        image, label = self.base[index]
        return torch.stack([self.transform(image), self.transform(image)]), label


# ----------------------------------------------------------------------------- one run's pipeline

class Pipeline:
    """The data loader's data sets and the batch steps of one run.

    ``train`` is what the training loader reads and :meth:`training_views` turns one of its
    batches into the ``[2B, 3, S, S]`` normalised rows of a step (view 1 of every image, then
    view 2); ``test`` (and ``train_plain``, the training images) and :meth:`inputs` give
    un-augmented inputs; :meth:`test_views` one random view of every test image (for the
    alignment metric)."""

    def __init__(self, data: ImageData, config: RunConfig):
        self.data, self.config = data, config
        size = config.img_size
        if config.augment == "simclr":
            self.view = simclr_transform(size, hflip=data.hflip, interpolation=config.interpolation)
            self.train = TwoViews(data.train, self.view)
        else:
            self.view = None
            self.train = Mapped(data.train, light_load_transform(size)) if data.files else data.train
        if data.files:
            plain = eval_transform(size, crop_pct=config.crop_pct, interpolation=config.interpolation)
            self.test, self.train_plain = Mapped(data.test, plain), Mapped(data.train, plain)
        else:
            self.test, self.train_plain = data.test, data.train

    def training_views(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = self.config
        if self.view is not None:  # [B, 2, C, S, S], augmented in the loader
            return normalize(torch.cat([batch[:, 0], batch[:, 1]]), c.mean, c.std)
        return torch.cat([  # two independent augmentations of every image
            model_input(batch, c.img_size, mean=c.mean, std=c.std, augment=True, hflip=self.data.hflip,
                        generator=generator)
            for _ in range(2)
        ])

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Test images (a batch of ``test``) -> model inputs."""
        return model_input(images, self.config.img_size, mean=self.config.mean, std=self.config.std)

    def test_views(self, generator: torch.Generator):
        """``(dataset, prepare)``: one random training-style view of every test image, to embed
        with ``prepare``. Draws from ``generator`` (light) or the global generator (simclr; the
        caller fixes its state)."""
        c = self.config
        if self.view is not None:
            return Mapped(self.data.test, self.view), lambda images: normalize(images, c.mean, c.std)
        return self.test, lambda images: model_input(images, c.img_size, mean=c.mean, std=c.std, augment=True,
                                                     hflip=self.data.hflip, generator=generator)
