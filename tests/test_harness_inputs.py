"""The harness on a user's own data: presets against timm's defaults, the model's input size and
normalisation, the SimCLR augmentation, SyncBatchNorm, and one-line errors for bad arguments."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("torchvision")

from fastcon.cli import main as fastcon_main
from fastcon.harness import augment
from fastcon.harness.config import PRESETS, UsageError, resolve
from fastcon.harness.models import build_network
from fastcon.harness.train import Dist, check_sync_bn, sync_batch_norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def _args(*argv):
    from fastcon.harness.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["finetune", *argv])


def _image_folder(root, classes=("a", "b", "c"), per_class=6, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


# ----------------------------------------------------------------------------- configuration

def test_digits_preset_is_the_default_for_the_digits_only():
    digits = resolve(_args())
    preset = PRESETS["digits"]
    assert (digits.preset, digits.model, digits.model_args, digits.img_size, digits.augment) == \
        ("digits", preset.model, preset.model_args, 16, "light")
    other = resolve(_args("--dataset", "imagefolder=/somewhere"))
    assert (other.preset, other.model, other.model_args, other.img_size, other.augment) == \
        (None, "vit_tiny_patch16_224", {}, None, "simclr")
    # explicit options override the preset; its model arguments belong to its own model only
    mixed = resolve(_args("--img-size", "8", "--augment", "simclr", "--model", "resnet10t"))
    assert (mixed.preset, mixed.model, mixed.model_args, mixed.img_size, mixed.augment) == \
        ("digits", "resnet10t", {}, 8, "simclr")
    on_folder = resolve(_args("--dataset", "imagefolder=/x", "--preset", "digits"))
    assert on_folder.model_args == preset.model_args and on_folder.img_size == 16
    assert resolve(_args("--preset", "none")).model_args == {}
    assert resolve(_args("--model-args", "")).model_args == {}


def test_model_input_size_and_normalisation_come_from_timm():
    config = resolve(_args("--dataset", "imagefolder=/x", "--model", "resnet10t"))
    net = build_network(config.model, config.model_args, num_classes=3, img_size=config.img_size, proj_dim=8)
    config = config.with_model_defaults(net.backbone)
    assert config.img_size == 176 and config.mean == IMAGENET_MEAN and config.std == (0.229, 0.224, 0.225)
    assert config.interpolation == "bicubic" and config.crop_pct == 0.875
    assert "resnet10t (registered architecture" in config.describe() and "176x176 px" in config.describe()

    vit = resolve(_args())  # the digits preset: a small ViT, whose own normalisation is 0.5 / 0.5
    net = build_network(vit.model, vit.model_args, num_classes=10, img_size=vit.img_size, proj_dim=8)
    vit = vit.with_model_defaults(net.backbone)
    assert vit.img_size == 16 and vit.mean == vit.std == (0.5, 0.5, 0.5)
    assert "patch_size=4, embed_dim=64, depth=4" in vit.describe() and "16x16 px" in vit.describe()
    assert net.backbone.patch_embed.num_patches == 16


def test_simclr_views_are_random_resized_crops_with_colour():
    from torchvision.transforms import v2

    view = augment.simclr_transform(24, hflip=True)
    kinds = [type(t).__name__ for t in view.transforms]
    for name in ("RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale"):
        assert name in kinds, kinds
    crop = next(t for t in view.transforms if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.2, 1.0)
    jitter = next(t for t in view.transforms if isinstance(t, v2.RandomApply))
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], v2.ColorJitter)
    assert next(t for t in view.transforms if isinstance(t, v2.RandomGrayscale)).p == 0.2
    unflipped = augment.simclr_transform(24, hflip=False).transforms
    assert "RandomHorizontalFlip" not in [type(t).__name__ for t in unflipped]

    torch.manual_seed(0)
    grey = torch.rand(1, 8, 8)  # a digit: grey, smaller than the input
    a, b = view(grey), view(grey)
    assert a.shape == b.shape == (3, 24, 24) and type(a) is torch.Tensor
    assert 0 <= a.min() and a.max() <= 1 and not torch.equal(a, b)


def test_imagefolder_end_to_end_with_simclr_and_the_models_normalisation(tmp_path, monkeypatch, capsys):
    """3 classes x 6 photos of 40 px, a real timm model at 32 px, one epoch of SupCon with the
    SimCLR views: the inputs are normalised with the model's own mean and std."""
    folder = _image_folder(tmp_path / "photos")
    seen = []
    original = augment.normalize

    def spy(images, mean, std):
        seen.append((tuple(images.shape), tuple(mean), tuple(std)))
        return original(images, mean, std)

    monkeypatch.setattr(augment, "normalize", spy)
    out = tmp_path / "run"
    assert fastcon_main(["finetune", "--loss", "supcon", "--dataset", f"imagefolder={folder}", "--model", "resnet10t",
                         "--img-size", "32", "--augment", "simclr", "--epochs", "1", "--batch-size", "5",
                         "--linear-epochs", "2", "--out", str(out)]) == 0
    for name in ("metrics.jsonl", "final.json", "model.safetensors", "model.json", "curves.png", "embeddings.png"):
        assert (out / name).stat().st_size > 0, name
    final = json.loads((out / "final.json").read_text())
    assert (final["model"], final["img_size"], final["augment"], final["preset"]) == ("resnet10t", 32, "simclr", None)
    assert np.isfinite(final["alignment"]) and 0 <= final["test_top1"] <= 1
    saved = json.loads((out / "model.json").read_text())
    assert tuple(saved["mean"]) == IMAGENET_MEAN and saved["img_size"] == 32
    training = [s for s in seen if s[0][0] == 10]  # 2 views x batch 5
    assert training and all(s == ((10, 3, 32, 32), IMAGENET_MEAN, (0.229, 0.224, 0.225)) for s in training)
    printed = capsys.readouterr().out
    assert "resnet10t (registered architecture" in printed and "32x32 px" in printed and "0.485" in printed


def test_imagefolder_test_images_take_timms_evaluation_transform(tmp_path):
    from fastcon.harness.config import RunConfig
    from fastcon.harness.data import load_dataset

    data = load_dataset(f"imagefolder={_image_folder(tmp_path / 'p', per_class=5, size=40)}")
    config = RunConfig(model="m", model_args={}, augment="simclr", img_size=20, mean=(0.5,) * 3, std=(0.5,) * 3,
                       crop_pct=0.875)
    pipeline = augment.Pipeline(data, config)
    image, _ = pipeline.test[0]
    assert image.shape == (3, 20, 20)
    views, _ = pipeline.train[0]
    assert views.shape == (2, 3, 20, 20) and not torch.equal(views[0], views[1])
    batch = torch.stack([views, views])
    assert pipeline.training_views(batch, torch.Generator()).shape == (4, 3, 20, 20)

    light = augment.Pipeline(data, RunConfig(**{**vars(config), "augment": "light"}))
    image, _ = light.train[0]  # read a little larger, then randomly warped to the input size per batch
    assert image.shape == (3, 23, 23) and light.test[0][0].shape == (3, 20, 20)
    assert light.training_views(image[None], torch.Generator()).shape == (2, 3, 20, 20)


# ----------------------------------------------------------------------------- SyncBatchNorm

def test_sync_bn_converts_batch_norms_under_ddp_on_cuda_only(capsys):
    net = build_network("resnet10t", {}, num_classes=3, img_size=None, proj_dim=8)
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    messages = []
    converted = sync_batch_norm(net, Dist(world_size=2), torch.device("cuda", 0), messages.append)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == batch_norms > 0
    assert f"{batch_norms} batch norm layer(s) synchronised across 2 processes" in messages[0]
    with pytest.raises(UsageError, match="--sync-bn: torch's SyncBatchNorm runs on CUDA devices only"):
        check_sync_bn(Dist(world_size=2), torch.device("cpu"))
    check_sync_bn(Dist(world_size=1), torch.device("cpu"))  # a single process: nothing to synchronise
    assert sync_batch_norm(net, Dist(), torch.device("cpu"), messages.append) is net
    assert "ignored" in messages[-1]


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model_xyz"], "--model 'no_such_model_xyz' is not a timm model name"),
    (["--dataset", "imagefolder=/no/such/dir"], "--dataset imagefolder=/no/such/dir: no such directory"),
    (["--model-args", "depth"], "--model-args: expected key=value, got 'depth'"),
    (["--model-args", "bogus_option=3", "--model", "resnet10t"],
     "--model-args bogus_option=3: resnet10t does not take"),
    (["--batch-size", "5000", "--epochs", "1"], "--batch-size 5000 is larger than the training set"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    assert fastcon_main(["finetune", *argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastcon: error: " + message), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_unknown_model_from_the_shell_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastcon", "finetune", "--model", "vit_nonexistent",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["fastcon: error: --model 'vit_nonexistent' is not a timm model name "
                                        "(timm.list_models('*vit*') lists some)"]
