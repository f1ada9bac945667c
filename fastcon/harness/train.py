"""The training loop behind ``fastcon finetune``, single-process or under torchrun (DDP).

Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set) the process group is
initialised (NCCL on CUDA, gloo on CPU), the network is wrapped in DDP, the training
set is sharded by a ``DistributedSampler`` and the contrastive losses gather every
rank's rows (``gather=True``). ``--batch-size`` is per process; ``--sync-bn`` turns the
model's batch norms into ``SyncBatchNorm`` (CUDA only), so that their statistics are those of
the whole batch. Only rank 0 shows progress and writes outputs.

Progress: tqdm bars on a terminal; when the output goes to a file or a pipe, one line per
epoch instead.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..gradcache import GradCache
from . import metrics as M
from .augment import Pipeline
from .config import RunConfig, UsageError, resolve
from .data import load_dataset
from .models import build_network, save_checkpoint
from .progress import Progress
from .recipes import make_recipe


@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(world_size, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def warmup_cosine(total_steps: int, warmup_fraction: float = 0.1):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def embed(net, dataset, prepare, device, *, batch_size: int = 512):
    """Backbone features, logits and labels of a whole data set (eval mode); ``prepare`` turns
    a batch of its images (on ``device``) into model inputs."""
    was_training = net.training
    net.eval()
    features, logits, labels = [], [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        f, out = net(prepare(images.to(device)))
        features.append(f.float().cpu())
        logits.append(out.float().cpu())
        labels.append(y)
    net.train(was_training)
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def train_linear_head(net, pipeline, args, device, progress) -> list:
    """LaCViT stage 2: the linear classifier on the frozen backbone's (un-augmented) features."""
    features, _, labels = embed(net, pipeline.train_plain, pipeline.inputs, device)
    features, labels = features.to(device), labels.to(device)
    classifier = net.classifier
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.linear_lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(labels) / args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.linear_epochs * steps_per_epoch, 0.0))
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    bar = progress(args.linear_epochs, f"{args.loss}: stage 2, linear classifier", unit="epoch")
    for epoch in range(args.linear_epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(labels), args.batch_size):
            idx = order[start:start + args.batch_size]
            loss = F.cross_entropy(classifier(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        history.append(total / len(labels))
        bar.update(1)
    bar.close(f"training loss {history[-1]:.4f}" if history else "")
    return history


def make_step(model, recipe, chunk_size=None):
    """``step(views, labels) -> loss``: forward and backward of one training step, gradients
    accumulated into ``.grad``; the loss comes back detached.

    With ``chunk_size`` the step goes through :class:`fastcon.GradCache`: the network runs on
    ``chunk_size`` rows (views) at a time, twice, and the parameters get the gradients of the
    plain whole-batch step with the activation memory of one chunk. The recipe's heads then
    see one chunk of rows at a time, so a recipe whose heads mix rows across the batch
    (Core-tuning) cannot be chunked.
    """
    if chunk_size:
        if not recipe.chunkable:
            raise ValueError(f"--chunk-size does not work with --loss {recipe.name}: its heads mix rows across the "
                             "whole batch, so running them chunk by chunk would change the objective")
        cache = GradCache(model, recipe.loss, chunk_size, forward=lambda rows: model(rows, recipe.heads, None))
        return cache.step

    def step(views, labels):
        loss = recipe.loss(model(views, recipe.heads, labels), labels)
        loss.backward()
        return loss.detach()

    return step


def prepare_backend(device: torch.device) -> None:
    """Pick the contrastive losses' backend now: a first use on CPU may compile the native
    kernel, and its notice must not land in the middle of a progress bar."""
    from .. import backends

    backends.auto(device)


def check_sync_bn(dist_info: Dist, device: torch.device) -> None:
    if dist_info.world_size > 1 and device.type != "cuda":
        raise UsageError(f"--sync-bn: torch's SyncBatchNorm runs on CUDA devices only; this run is on {device.type}")


def sync_batch_norm(net, dist_info: Dist, device: torch.device, log):
    """``--sync-bn``: the model's batch norms as ``SyncBatchNorm``, so that under DDP their
    statistics are those of every rank's rows."""
    if dist_info.world_size == 1:
        log("--sync-bn: a single process has no other rank to synchronise batch statistics with; ignored")
        return net
    check_sync_bn(dist_info, device)
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    count = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
    log(f"--sync-bn: {count} batch norm layer(s) synchronised across {dist_info.world_size} processes")
    return net


def finetune(args, *, return_model: bool = False):
    """Train one recipe; returns the final metrics (rank 0 also writes them to ``args.out``),
    and the trained network too when ``return_model``. A wrong argument raises
    :class:`~fastcon.harness.config.UsageError` before any training."""
    started = time.time()
    config = resolve(args)
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cpu" and args.threads > 0:
        # The default ViT's matrices are too small for intra-op parallelism to pay, and on a
        # busy machine several spinning threads per process slow every op down many times.
        torch.set_num_threads(args.threads)
    dist_info = init_distributed(device)
    if args.sync_bn:
        check_sync_bn(dist_info, device)  # before any heavy work
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    log = _logger(dist_info)

    def progress(total, desc, unit="it"):
        return Progress(total, desc, enabled=dist_info.main and not args.quiet, unit=unit)

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    data = load_dataset(args.dataset, seed=args.seed)
    net = build_network(config.model, config.model_args, num_classes=data.num_classes, img_size=config.img_size,
                        proj_dim=args.proj_dim, pretrained=args.pretrained, log=log)
    config = config.with_model_defaults(net.backbone)
    net = net.to(device)
    pipeline = Pipeline(data, config)
    recipe = make_recipe(args, num_classes=data.num_classes, world_size=dist_info.world_size, rank=dist_info.rank)
    if args.sync_bn:
        net = sync_batch_norm(net, dist_info, device, log)
    model = net
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A recipe leaves a head unused (CE: the projector; SupCon: the classifier).
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)

    if dist_info.world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(pipeline.train, shuffle=True, seed=args.seed, drop_last=True)
        loader = DataLoader(pipeline.train, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            num_workers=args.workers)
    else:
        sampler = None
        loader = DataLoader(pipeline.train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({len(data.train)} images over {dist_info.world_size} process(es))")

    step = make_step(model, recipe, getattr(args, "chunk_size", None))
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, args.warmup))
    augment_rng = torch.Generator().manual_seed(args.seed * 1000 + dist_info.rank)

    if dist_info.main:
        os.makedirs(args.out, exist_ok=True)
        epoch_log = open(os.path.join(args.out, "metrics.jsonl"), "w")
    log(f"{recipe.name}: {config.describe()}")
    log(f"{recipe.name}: {data.name} ({len(data.train)} train / {len(data.test)} test images, "
        f"{data.num_classes} classes), {args.epochs} epochs x {len(loader)} steps, "
        f"world size {dist_info.world_size}, device {device}"
        + (f", gradient caching in chunks of {args.chunk_size} rows" if getattr(args, "chunk_size", None) else ""))
    prepare_backend(device)

    history = []
    train_seconds = 0.0
    bar = progress(total_steps, recipe.name + (": stage 1" if recipe.two_stage else ""))
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        epoch_start = time.time()
        loss_sum, count = 0.0, 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            views = pipeline.training_views(images, augment_rng)
            optimizer.zero_grad(set_to_none=True)
            loss = step(views, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{recipe.name}: the loss became {loss.item()} at epoch {epoch + 1}; "
                                         "try a smaller --lr")
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            count += 1
            bar.update(1, epoch=epoch + 1, loss=f"{loss.item():.3f}")
        train_seconds += time.time() - epoch_start
        record = {"epoch": epoch + 1, "stage": 1, "train_loss": loss_sum / count,
                  "lr": schedule.get_last_lr()[0], "seconds": round(train_seconds, 2)}
        # (SupCon's classifier is only trained in stage 2, so its stage 1 has no accuracy to show)
        if not recipe.two_stage and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            _, logits, test_labels = embed(net, pipeline.test, pipeline.inputs, device)
            record["test_top1"] = M.top1(logits, test_labels)
            bar.update(0, epoch=epoch + 1, loss=f"{record['train_loss']:.3f}", test_top1=f"{record['test_top1']:.3f}")
        bar.line(f"epoch {epoch + 1}/{args.epochs}, training loss {record['train_loss']:.4f}"
                 + (f", test top-1 {record['test_top1']:.4f}" if "test_top1" in record else "")
                 + f", {train_seconds:.1f} s")
        history.append(record)
        if dist_info.main:
            epoch_log.write(json.dumps(record) + "\n")
            epoch_log.flush()
    bar.close()

    if recipe.two_stage:
        stage_start = time.time()
        for epoch, loss_value in enumerate(train_linear_head(net, pipeline, args, device, progress)):
            history.append({"epoch": args.epochs + epoch + 1, "stage": 2, "train_loss": loss_value})
            if dist_info.main:
                epoch_log.write(json.dumps(history[-1]) + "\n")
        train_seconds += time.time() - stage_start

    final = evaluate(net, pipeline, device)
    final.update({
        "loss": recipe.name, "model": config.model, "model_config": config.describe(), "preset": config.preset,
        "img_size": config.img_size, "augment": config.augment, "dataset": data.name, "epochs": args.epochs,
        "world_size": dist_info.world_size, "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.time() - started, 2), "peak_rss_mb": round(M.peak_rss_mb(), 1),
    })
    if device.type == "cuda":
        final["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if dist_info.main:
        epoch_log.close()
        _write_outputs(net, pipeline, args, config, final, history, device)
        log(f"{recipe.name}: test top-1 {final['test_top1']:.4f}, alignment {final['alignment']:.3f}, "
            f"uniformity {final['uniformity']:.3f}, isotropy {final['isotropy']:.3f}, "
            f"train {final['train_seconds']:.0f} s -> {args.out}")
    return (final, net) if return_model else final


def evaluate(net, pipeline: Pipeline, device) -> dict:
    """Test top-1 and the embedding metrics; the two augmented views of every test image
    (for the alignment) are drawn with a fixed seed, so runs are compared on the same views."""
    features, logits, labels = embed(net, pipeline.test, pipeline.inputs, device)
    generator = torch.Generator().manual_seed(12345)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        views = [embed(net, *pipeline.test_views(generator), device)[0] for _ in range(2)]
    result = {"test_top1": M.top1(logits, labels)}
    result.update(M.embedding_metrics(features, labels, *views))
    return result


def _write_outputs(net, pipeline: Pipeline, args, config: RunConfig, final, history, device):
    from . import plots

    checkpoint = {"model": config.model, "model_args": config.model_args, "num_classes": pipeline.data.num_classes,
                  "proj_dim": args.proj_dim, **config.input_config()}
    save_checkpoint(net, args.out, checkpoint)
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump({**final, "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=2)
    features, _, labels = embed(net, pipeline.test, pipeline.inputs, device)
    plots.curves(history, os.path.join(args.out, "curves.png"), title=final["loss"], final_top1=final["test_top1"])
    plots.embedding_projection(features, labels, os.path.join(args.out, "embeddings.png"),
                               title=f"{final['loss']}: test embeddings (PCA)")


def _logger(dist_info: Dist):
    def log(message: str) -> None:
        if dist_info.main:
            from tqdm.auto import tqdm

            tqdm.write(message)

    return log
