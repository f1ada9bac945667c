"""The fine-tuning harness end to end (tiny configurations on the digits), its data
loading errors, checkpoints, and the blockwise hard-pair mining of Core-tuning."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

from fastcon.cli import main as fastcon_main
from fastcon.harness.data import DatasetError, load_dataset
from fastcon.harness.models import build_network, load_checkpoint
from fastcon.harness.recipes import LOSSES, loss_kwargs
from fastcon.mining import hard_pairs

# fine-tuning runs of the harness: the slow suite
pytestmark = pytest.mark.slow

# A one-block ViT on the 8x8 digits at their own size (4 patches): a few seconds per recipe.
TINY = ["--model-args", "patch_size=4,embed_dim=48,depth=1,num_heads=2,mlp_ratio=2", "--img-size", "8",
        "--epochs", "5", "--batch-size", "32", "--eval-every", "1", "--linear-epochs", "20", "--lr", "5e-3",
        "--quiet"]
RUN_FILES = ("metrics.jsonl", "final.json", "model.safetensors", "model.json", "curves.png", "embeddings.png")


# ----------------------------------------------------------------------------- mining

def dense_hard_pairs(features, labels):
    z = F.normalize(features.double(), dim=1)
    sim = z @ z.T
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    hn = torch.where((~same).any(1), sim.masked_fill(same, -np.inf).argmax(1), torch.arange(n))
    hp = torch.where((same & ~eye).any(1), sim.masked_fill(~same | eye, np.inf).argmin(1), torch.arange(n))
    return hn, hp


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_hard_pairs_match_dense(block_rows):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(53, 11, generator=g)
    labels = torch.randint(0, 5, (53,), generator=g)
    labels[0] = 17  # a singleton class: hp(0) = 0
    hn, hp = hard_pairs(features, labels, block_rows=block_rows)
    dense_hn, dense_hp = dense_hard_pairs(features, labels)
    assert torch.equal(hn, dense_hn)
    assert torch.equal(hp, dense_hp)
    assert hp[0] == 0
    assert (labels[hn] != labels).all()
    others = torch.tensor([(labels == labels[i]).sum() > 1 for i in range(53)])
    assert (labels[hp] == labels).all() and (hp[others] != torch.arange(53)[others]).all()


def test_hard_pairs_one_class_maps_to_self_for_negatives():
    features = torch.randn(6, 4)
    hn, hp = hard_pairs(features, torch.zeros(6, dtype=torch.long), block_rows=4)
    assert torch.equal(hn, torch.arange(6))
    assert (hp != torch.arange(6)).all()


# ----------------------------------------------------------------------------- data errors

def _write_cifar(root, num_train=8, num_test=4, names=None, label_key=b"labels"):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    names = names or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = num_test if "test" in name else num_train
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(rng.integers(0, 10, n))}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_pickles_load(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_dataset(f"cifar10={tmp_path}")
    assert len(data.train) == 40 and len(data.test) == 4 and data.num_classes == 10
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1 and 0 <= label < 10


@pytest.mark.parametrize("spec, message", [
    ("digits=/x", "takes no path"),
    ("mnist", "unknown --dataset"),
    ("cifar10", "needs a directory"),
    ("cifar10={missing}", "no such directory"),
    ("imagefolder={missing}", "no such directory"),
    ("cifar10={empty}", "expected the python-pickle batches data_batch_1"),
    ("cifar100={empty}", "expected the python-pickle batches train"),
])
def test_dataset_spec_errors(tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    spec = spec.format(missing=tmp_path / "nope", empty=tmp_path / "empty")
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec)


def test_cifar_malformed_files(tmp_path):
    _write_cifar(tmp_path / "garbage")
    (tmp_path / "garbage" / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="data_batch_3: not a CIFAR python-pickle batch"):
        load_dataset(f"cifar10={tmp_path / 'garbage'}")

    _write_cifar(tmp_path / "keys", names=["train", "test"], label_key=b"labels")  # CIFAR-100 wants fine_labels
    with pytest.raises(DatasetError, match="fine_labels"):
        load_dataset(f"cifar100={tmp_path / 'keys'}")

    _write_cifar(tmp_path / "shape")
    with open(tmp_path / "shape" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DatasetError, match=r"shape \[N, 3072\]"):
        load_dataset(f"cifar10={tmp_path / 'shape'}")


def _write_images(folder, classes, per_class=5):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(folder / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder_layouts_and_errors(tmp_path):
    _write_images(tmp_path / "flat", ["a", "b", "c"])
    data = load_dataset(f"imagefolder={tmp_path / 'flat'}")
    assert (len(data.train), len(data.test), data.num_classes) == (12, 3, 3)
    assert data.files and data.train[0][0].size == (10, 12)  # the photo itself: views are cut from it

    _write_images(tmp_path / "split" / "train", ["a", "b"])
    _write_images(tmp_path / "split" / "val", ["a", "b"], per_class=2)
    data = load_dataset(f"imagefolder={tmp_path / 'split'}")
    assert (len(data.train), len(data.test)) == (10, 4)

    _write_images(tmp_path / "mismatch" / "train", ["a", "b"])
    _write_images(tmp_path / "mismatch" / "test", ["a", "c"])
    with pytest.raises(DatasetError, match="different class folders"):
        load_dataset(f"imagefolder={tmp_path / 'mismatch'}")

    (tmp_path / "noimages" / "a").mkdir(parents=True)
    (tmp_path / "noimages" / "b").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not in ImageFolder layout"):
        load_dataset(f"imagefolder={tmp_path / 'noimages'}")

    _write_images(tmp_path / "oneclass", ["a"])
    with pytest.raises(DatasetError, match="need 2"):
        load_dataset(f"imagefolder={tmp_path / 'oneclass'}")


def test_cli_reports_dataset_error(tmp_path, capsys):
    assert fastcon_main(["finetune", "--dataset", f"cifar10={tmp_path / 'nope'}", "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- recipes end to end

@pytest.mark.parametrize("loss", LOSSES)
def test_recipe_end_to_end(tmp_path, loss):
    out = tmp_path / loss
    assert fastcon_main(["finetune", "--loss", loss, "--out", str(out), *TINY]) == 0
    for name in RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    final = json.loads((out / "final.json").read_text())
    for key in ("test_top1", "alignment", "class_alignment", "uniformity", "isotropy", "effective_rank",
                "train_seconds", "peak_rss_mb"):
        assert np.isfinite(final[key]), key
    assert final["test_top1"] > 0.3  # chance is 0.1
    assert 0 < final["isotropy"] <= 1 and 1 <= final["effective_rank"] <= 48
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["stage"] == 1] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(e["train_loss"]) for e in epochs)

    # the checkpoint gives back the same model: the same test predictions and accuracy
    from fastcon.harness.augment import model_input
    from fastcon.harness.train import embed

    data = load_dataset("digits")
    net = load_checkpoint(str(out))
    saved = json.loads((out / "model.json").read_text())
    assert saved["img_size"] == 8 and saved["mean"] == saved["std"] == [0.5, 0.5, 0.5]

    def prepare(images):
        return model_input(images, saved["img_size"], mean=saved["mean"], std=saved["std"])

    _, logits, labels = embed(net, data.test, prepare, torch.device("cpu"))
    assert (logits.argmax(1) == labels).float().mean().item() == final["test_top1"]
    _, again, _ = embed(load_checkpoint(str(out)), data.test, prepare, torch.device("cpu"))
    assert torch.equal(logits, again)


def test_checkpoint_reload_gives_identical_predictions(tmp_path):
    from fastcon.harness.train import finetune
    from fastcon.harness.cli import register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--loss", "ce", "--out", str(tmp_path), *TINY, "--epochs", "1"])
    final, net = finetune(args, return_model=True)
    x = torch.randn(17, 3, 8, 8)
    with torch.no_grad():
        expected = net.eval()(x)
        got = load_checkpoint(str(tmp_path))(x)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_compare_writes_table(tmp_path, capsys):
    assert fastcon_main(["compare", "--losses", "ce,clce", "--out", str(tmp_path), *TINY, "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| ce |" in printed and "| clce |" in printed
    rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("loss,test_top1,alignment") and len(rows) == 3
    assert (tmp_path / "compare.md").read_text().startswith("| loss |")
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert (tmp_path / "ce" / "final.json").exists() and (tmp_path / "clce" / "final.json").exists()


def test_compare_rejects_unknown_loss(tmp_path, capsys):
    assert fastcon_main(["compare", "--losses", "ce,triplet", "--out", str(tmp_path)]) == 2
    assert "triplet" in capsys.readouterr().err


def test_curve_writes_one_row_per_loss_and_batch_size(tmp_path, capsys):
    args = ["curve", "--batch-sizes", "16,32", "--losses", "ce,clce", "--out", str(tmp_path), *TINY,
            "--epochs", "1", "--linear-epochs", "2"]
    assert fastcon_main(args) == 0
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("loss,batch_size,contrast_rows,epochs,steps,lr,test_top1,alignment")
    cells = [r.split(",") for r in rows[1:]]
    assert sorted((c[0], int(c[1])) for c in cells) == [("ce", 16), ("ce", 32), ("clce", 16), ("clce", 32)]
    # same steps (the default): the budget is 1 epoch at --batch-size 32, rounded up to whole epochs
    assert {(int(c[1]), int(c[3]), int(c[4])) for c in cells} == {(16, 1, 84), (32, 1, 42)}
    assert {(c[0], int(c[1]), int(c[2])) for c in cells} >= {("clce", 16, 32), ("ce", 32, 0)}
    md = (tmp_path / "curve.md").read_text()
    assert md.startswith("| loss | batch |")
    assert len([line for line in md.splitlines() if line.startswith(("| ce |", "| clce |"))]) == 4
    assert "fastcon curve --batch-sizes 16,32 --losses ce,clce --match steps" in md
    # what the defaults resolved to is written out, so the command repeats the run if they change
    for option in ("--preset digits", "--model vit_tiny_patch16_224", "--img-size 8", "--augment light",
                   "--model-args patch_size=4,embed_dim=48,depth=1,num_heads=2,mlp_ratio=2"):
        assert option in md, option
    assert (tmp_path / "curve.png").stat().st_size > 0
    for size in (16, 32):
        for loss in ("ce", "clce"):
            assert (tmp_path / f"bs{size}" / loss / "final.json").exists()
    assert "| clce | 32 | 64 |" in capsys.readouterr().out


def test_curve_budget_plan():
    import argparse

    from fastcon.harness.curve import parse_batch_sizes, plan

    args = argparse.Namespace(epochs=25, batch_size=64, lr=1e-3, match="steps", lr_scale="none")
    steps = plan(1347, [32, 64, 128, 256], args)  # the digits' training split: 21 steps per epoch at 64
    assert [(p["epochs"], p["steps"]) for p in steps] == [(13, 546), (25, 525), (53, 530), (105, 525)]
    assert all(p["lr"] == 1e-3 for p in steps)
    args.match, args.lr_scale = "epochs", "sqrt"
    epochs = plan(1347, [32, 256], args)
    assert [(p["epochs"], p["steps"]) for p in epochs] == [(25, 1050), (25, 125)]
    assert epochs[1]["lr"] == pytest.approx(2e-3)
    assert plan(1347, [128], args, world_size=2)[0]["steps"] == 25 * 5
    with pytest.raises(ValueError, match="larger than the training set"):
        plan(1347, [2048], args)
    assert parse_batch_sizes("256, 32,64") == [32, 64, 256]
    for text, message in (("32,x", "not an integer"), ("1", "too small"), ("32,32", "repeated"), (",", "no batch")):
        with pytest.raises(ValueError, match=message):
            parse_batch_sizes(text)


def test_curve_rejects_bad_arguments(tmp_path, capsys):
    assert fastcon_main(["curve", "--batch-sizes", "32,abc", "--out", str(tmp_path)]) == 2
    assert "not an integer" in capsys.readouterr().err
    assert fastcon_main(["curve", "--batch-sizes", "32,4096", "--out", str(tmp_path)]) == 2
    assert "larger than the training set" in capsys.readouterr().err
    assert fastcon_main(["curve", "--losses", "ce,triplet", "--out", str(tmp_path)]) == 2
    assert "triplet" in capsys.readouterr().err
    assert not (tmp_path / "curve.csv").exists()


# ----------------------------------------------------------------------------- models

def test_pretrained_checkpoint_drops_head(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    args = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, img_size=8)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **args)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        messages = []
        net = build_network("vit_tiny_patch16_224", {k: v for k, v in args.items() if k != "img_size"},
                            num_classes=10, img_size=8, proj_dim=16, pretrained=str(tmp_path / name),
                            log=messages.append)
        assert any("dropped 2" in m and "head.weight" in m for m in messages), messages
        assert torch.equal(net.backbone.pos_embed, source.pos_embed)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_network("vit_tiny_patch16_224", {}, num_classes=10, img_size=8, proj_dim=16,
                      pretrained=str(tmp_path / "missing.pth"))


def test_any_timm_model_name():
    net = build_network("resnet10t", {}, num_classes=3, img_size=16, proj_dim=8)
    features, logits = net(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 3) and features.shape == (2, net.backbone.num_features)
    with pytest.raises(ValueError, match="not a timm model"):
        build_network("no_such_model_xyz", {}, num_classes=3, img_size=16, proj_dim=8)


# ----------------------------------------------------------------------------- distributed

def test_losses_gather_only_with_several_ranks(monkeypatch):
    """Every contrastive loss goes through fastcon's public modules with backend="auto",
    and gathers across ranks exactly when there are several."""
    import argparse

    import fastcon
    from fastcon.harness import recipes

    built = []

    def recorder(name):
        return lambda **kw: built.append((name, kw))

    for name in ("SupConLoss", "SCHaNeLoss", "CLCELoss", "FocalSupConLoss"):
        monkeypatch.setattr(fastcon, name, recorder(name))
    args = argparse.Namespace(temperature=0.07, base_temperature=0.07, beta=1.0, alpha=0.5, eta=0.1, gamma=1.0,
                              mix_alpha=1.0)
    for world_size in (1, 2):
        built.clear()
        for loss in LOSSES:
            recipes.make_recipe(argparse.Namespace(**vars(args), loss=loss), num_classes=10, world_size=world_size)
        assert sorted(n for n, _ in built) == ["CLCELoss", "FocalSupConLoss", "SCHaNeLoss", "SupConLoss"]
        for _, kw in built:
            assert kw["backend"] == "auto"
            assert kw.get("gather", False) is (world_size > 1)
    assert loss_kwargs(1) == {"backend": "auto"}


def _losses_can_gather() -> bool:
    import inspect

    import fastcon

    return "gather" in inspect.signature(fastcon.SupConLoss).parameters


def test_torchrun_two_processes(tmp_path):
    """DDP on gloo: both ranks train, only rank 0 writes. With losses that can gather across
    ranks (issue 6) a contrastive recipe runs, else cross-entropy."""
    loss = "clce" if _losses_can_gather() else "ce"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastcon", "finetune", "--loss", loss, "--out", str(tmp_path / "run"), *TINY, "--epochs", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["world_size"] == 2 and final["loss"] == loss and final["test_top1"] > 0.2
    assert done.stdout.count("test top-1") + done.stderr.count("test top-1") == 1  # rank 0 only


def test_two_views_are_independent_augmentations():
    from fastcon.harness.augment import model_input

    images = torch.rand(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    half = (0.5, 0.5, 0.5)
    v1 = model_input(images, 16, mean=half, std=half, augment=True, generator=g)
    v2 = model_input(images, 16, mean=half, std=half, augment=True, generator=g)
    assert v1.shape == v2.shape == (4, 3, 16, 16)
    assert not torch.allclose(v1, v2)
    plain = model_input(images, 16, mean=half, std=half)
    assert plain.shape == (4, 3, 16, 16) and -1 <= plain.min() and plain.max() <= 1


# ----------------------------------------------------------------------------- gradient caching

def _finetune_args(*extra):
    import argparse

    from fastcon.harness.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["finetune", *TINY, *extra])


@pytest.mark.parametrize("loss", ["ce", "supcon", "schane", "clce"])
def test_chunked_first_step_equals_plain_step(loss):
    """The harness's step with --chunk-size (GradCache) and without it, from the same weights
    on the same two-view batch, then one AdamW step. In float64 the two differ only by the
    order of floating-point sums (chunked matrix products, gradients accumulated chunk by
    chunk): the gradients agree to 1e-10 of their norm. The parameters after the step get
    an atol of 1e-9: AdamW's first update is lr * g / (|g| + eps), so where the true
    gradient is exactly zero (the attention's key bias, to which softmax is invariant)
    rounding noise of ~1e-17 in g moves a parameter by up to lr * 1e-17 / 1e-8 ~ 1e-11 in
    one step and not the other; every other entry moves by about lr = 5e-3 in both.
    (The default ViT has no dropout; with dropout the plain step would draw its masks for
    the whole batch at once and differ: tests/test_gradcache.py covers random layers.)"""
    import copy

    from torch.utils.data import DataLoader

    from fastcon.harness.augment import model_input
    from fastcon.harness.config import resolve
    from fastcon.harness.recipes import make_recipe
    from fastcon.harness.train import make_step

    args = _finetune_args("--loss", loss)
    config = resolve(args)
    torch.manual_seed(0)
    data = load_dataset("digits")
    net = build_network(config.model, config.model_args, num_classes=10, img_size=8, proj_dim=16).double()
    recipe = make_recipe(args, num_classes=10)
    images, labels = next(iter(DataLoader(data.train, batch_size=13, shuffle=False)))
    g = torch.Generator().manual_seed(0)
    half = (0.5, 0.5, 0.5)
    views = torch.cat([model_input(images, 8, mean=half, std=half, augment=True, generator=g)
                       for _ in range(2)]).double()

    params, losses, grads = {}, {}, {}
    for chunk in (None, 5, 26, 64):  # 26 rows in all: uneven chunks, one chunk, a chunk larger than the batch
        model = copy.deepcopy(net)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        optimizer.zero_grad(set_to_none=True)
        rows = []
        model.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
        losses[chunk] = make_step(model, recipe, chunk)(views, labels)
        grads[chunk] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        expected = {None: [26], 5: [5, 5, 5, 5, 5, 1] * 2, 26: [26, 26], 64: [26, 26]}  # chunks, twice
        assert rows == expected[chunk], rows
        params[chunk] = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = sum((params[None][n] - p).abs().sum() for n, p in net.named_parameters())
    assert moved > 0
    for chunk in (5, 26, 64):
        torch.testing.assert_close(losses[chunk], losses[None], rtol=1e-12, atol=0)
        assert grads[chunk].keys() == grads[None].keys() and grads[None]
        for name, want in grads[None].items():
            err = (grads[chunk][name] - want).norm() / want.norm().clamp_min(1e-30)
            assert err <= 1e-10 or want.norm() < 1e-14, f"chunk {chunk}, gradient of {name}: relative error {err:.3g}"
        for name, want in params[None].items():
            torch.testing.assert_close(params[chunk][name], want, rtol=1e-10, atol=1e-9,
                                       msg=lambda m: f"chunk {chunk}, {name}: {m}")


def test_chunk_size_end_to_end_and_errors(tmp_path, capsys):
    out = tmp_path / "supcon"
    assert fastcon_main(["finetune", "--loss", "supcon", "--chunk-size", "24", "--out", str(out), *TINY,
                         "--epochs", "1", "--linear-epochs", "2"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["args"]["chunk_size"] == 24 and np.isfinite(final["alignment"])
    assert fastcon_main(["finetune", "--loss", "core", "--chunk-size", "8", "--out", str(tmp_path / "c")]) == 2
    assert "--chunk-size does not work with core" in capsys.readouterr().err
    assert fastcon_main(["compare", "--losses", "ce,core", "--chunk-size", "8", "--out", str(tmp_path / "d")]) == 2
    for bad in ("0", "-4", "x"):
        with pytest.raises(SystemExit):
            fastcon_main(["finetune", "--chunk-size", bad])
    assert "expected a positive integer" in capsys.readouterr().err
