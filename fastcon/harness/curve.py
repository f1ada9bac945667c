"""``fastcon curve``: every loss at several batch sizes, against cross-entropy.

The seed papers' claim is that supervised contrastive losses get better with the number of
contrast rows, i.e. with the batch size. This trains each recipe (cross-entropy as the
baseline) at each ``--batch-sizes`` value with the same data, seed and model, and writes
``curve.csv``, ``curve.md`` (the table, the gap to CE at the same batch size, and the exact
command) and ``curve.png`` (test top-1, alignment and uniformity against the batch size on a
log2 axis, one line per loss).

Budget: by default every batch size gets the same number of optimisation steps (``--match
steps``): as many as ``--epochs`` epochs take at ``--batch-size``, with the same learning
rate and schedule, so a larger batch sees more data. ``--match epochs`` gives every batch
size ``--epochs`` epochs instead (the same images seen, fewer steps at a larger batch).
Either way the CE line gets the same budget, so the gap between a contrastive loss and CE at
the same batch size sets the loss's batch-size effect against the one any loss gets from the
budget (it isolates the contrast rows only as far as both respond alike to training length).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import time

from .recipes import LOSSES

DEFAULT_LOSSES = ("ce", "supcon", "schane", "core")  # clce is schane built another way: same numbers

CURVE_COLUMNS = ("loss", "batch_size", "contrast_rows", "epochs", "steps", "lr", "test_top1", "alignment",
                 "class_alignment", "uniformity", "isotropy", "effective_rank", "train_seconds")

MATCH_HELP = (
    "steps: every batch size gets the number of optimisation steps that --epochs epochs take at --batch-size "
    "(rounded up to whole epochs), with the same learning-rate schedule; a larger batch then sees more data, "
    "and costs more time. This is the default because on a small data set a fixed number of epochs leaves the "
    "large batches with only a few updates (about 125 at batch 256 for 25 epochs of the digits), and that "
    "under-training would swamp any effect of the number of contrast rows. epochs: every batch size gets "
    "--epochs epochs (the same images seen, fewer steps at a larger batch; the seed papers' setting on large "
    "data). CE gets the same budget in both; the 'vs CE' column is the top-1 gap to it at the same batch size."
)


def register(subparsers) -> None:
    from .cli import VIEWS_NOTE, HelpFormatter, _add_common

    curve = subparsers.add_parser(
        "curve", help="train every loss at several batch sizes; table and plot against batch size",
        description="Train each loss (CE as the baseline) at each batch size with the same data, seed and model, "
                    "then write curve.csv, curve.md (with the command) and curve.png (test top-1, alignment and "
                    "uniformity against batch size, log2 axis). " + VIEWS_NOTE,
        epilog="Per-run outputs (metrics.jsonl, final.json, checkpoints, plots) go to OUT/bs<B>/<loss>/.",
        formatter_class=HelpFormatter)
    curve.add_argument("--batch-sizes", default="32,64,128,256",
                       help="comma-separated batch sizes (images per step per process; each gives 2 views)")
    curve.add_argument("--losses", default=",".join(DEFAULT_LOSSES),
                       help=f"comma-separated losses from {','.join(LOSSES)} (clce is schane built through "
                            "CLCELoss and gives the same numbers, so it is left out by default)")
    curve.add_argument("--match", choices=("steps", "epochs"), default="steps", help=MATCH_HELP)
    curve.add_argument("--lr-scale", choices=("none", "sqrt", "linear"), default="none",
                       help="learning rate at batch size B: --lr times (B / --batch-size) to the power 0, 1/2 "
                            "or 1")
    _add_common(curve, out_help="output directory: curve.csv, curve.md, curve.png and bs<B>/<loss>/ per run "
                                "(default runs/<timestamp>-curve)")
    for action in curve._actions:
        if action.dest == "batch_size":
            action.help = ("reference batch size: with --match steps the step budget is --epochs epochs at this "
                           "batch size; --lr-scale scales the learning rate relative to it")
    curve.set_defaults(func=run_curve)


def parse_batch_sizes(text: str) -> list:
    sizes = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            size = int(item)
        except ValueError:
            raise ValueError(f"--batch-sizes: {item!r} is not an integer") from None
        if size < 2:
            raise ValueError(f"--batch-sizes: {size} is too small (a contrastive batch needs at least 2 images)")
        sizes.append(size)
    if not sizes:
        raise ValueError("--batch-sizes: no batch size given")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--batch-sizes: repeated values in {text!r}")
    return sorted(sizes)


def steps_per_epoch(num_train: int, batch_size: int, world_size: int = 1) -> int:
    """What the training loop does: each rank gets ``num_train // world_size`` images (the
    distributed sampler drops the rest) and drops its last partial batch."""
    return (num_train // world_size) // batch_size


def plan(num_train: int, batch_sizes: list, args, world_size: int = 1) -> list:
    """One ``{batch_size, epochs, steps, lr}`` per batch size under ``args.match`` / ``args.lr_scale``."""
    reference = steps_per_epoch(num_train, args.batch_size, world_size)
    budget = args.epochs * reference
    if args.match == "steps" and reference == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set ({num_train} images)")
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[args.lr_scale]
    rows = []
    for size in batch_sizes:
        per_epoch = steps_per_epoch(num_train, size, world_size)
        if per_epoch == 0:
            raise ValueError(f"--batch-sizes: {size} is larger than the training set ({num_train} images over "
                             f"{world_size} process(es))")
        epochs = args.epochs if args.match == "epochs" else max(1, math.ceil(budget / per_epoch))
        rows.append({"batch_size": size, "epochs": epochs, "steps": epochs * per_epoch,
                     "lr": args.lr * (size / args.batch_size) ** power})
    return rows


def contrast_rows(loss: str, batch_size: int, world_size: int = 1) -> int:
    """Rows each anchor is contrasted against in one step (both views of every rank's batch);
    Core-tuning's contrastor also sees a hard negative and a hard positive per row, as negatives."""
    if loss == "ce":
        return 0
    rows = 2 * batch_size * world_size
    return 3 * rows if loss == "core" else rows


def command_line(args, config=None) -> str:
    """The ``fastcon curve`` command with every option written out, so the run can be repeated
    even if a default changes later (output and display options left out). With ``config``
    (:func:`~fastcon.harness.config.resolve`'s answer), the preset, model, model arguments,
    input size and augmentation it resolved are written out too."""
    values = dict(vars(args))
    if config is not None:
        resolved = {"preset": config.preset or "none", "model": config.model, "augment": config.augment,
                    "model_args": ",".join(f"{k}={v}" for k, v in config.model_args.items()),
                    "img_size": config.img_size}
        values.update({k: v for k, v in resolved.items() if values.get(k) is None})
    words = ["fastcon", "curve"]
    for key, value in values.items():
        if key in ("func", "command", "out", "quiet", "workers") or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words.append(str(value))
    return shlex.join(words)


def run_curve(args) -> int:
    from .cli import _default_out, _end_distributed, _fail
    from .config import UsageError, resolve
    from .data import load_dataset
    from .progress import Progress
    from .train import finetune, prepare_backend, resolve_device

    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    unknown = [name for name in losses if name not in LOSSES]
    if unknown or not losses:
        return _fail(f"--losses: unknown {unknown}; choose from {','.join(LOSSES)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        batch_sizes = parse_batch_sizes(args.batch_sizes)
        config = resolve(args)
        num_train = len(load_dataset(args.dataset, seed=args.seed).train)
        schedule = plan(num_train, batch_sizes, args, world_size)
    except ValueError as exc:  # UsageError included
        return _fail(str(exc))
    root = args.out or _default_out("curve")
    command = command_line(args, config)
    runs = [(point, name) for point in schedule for name in losses]
    prepare_backend(resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0"))))
    bar = Progress(len(runs), "curve", enabled=main_rank and not args.quiet, unit="run")
    rows = []
    started = time.time()
    try:
        for i, (point, name) in enumerate(runs):
            bar.update(0, batch=point["batch_size"], loss=name)
            bar.line(f"run {i + 1}/{len(runs)}: {name} at batch size {point['batch_size']}")
            run_args = argparse.Namespace(**{
                **vars(args), "loss": name, "batch_size": point["batch_size"], "epochs": point["epochs"],
                "lr": point["lr"], "out": os.path.join(root, f"bs{point['batch_size']}", name)})
            final = finetune(run_args)
            rows.append({**final, **point, "contrast_rows": contrast_rows(name, point["batch_size"], world_size)})
            bar.update(1)
    except (UsageError, FileNotFoundError) as exc:
        return _fail(str(exc))
    finally:
        bar.close()
        _end_distributed()
    if main_rank:
        print(write_curve(rows, root, args=args, command=command, total_seconds=time.time() - started))
    return 0


def format_curve_table(rows: list) -> str:
    """Markdown: one row per (loss, batch size), with the top-1 gap to CE at the same batch size."""
    ce = {r["batch_size"]: r["test_top1"] for r in rows if r["loss"] == "ce"}
    header = ["loss", "batch", "contrast rows", "epochs", "steps", "top-1 %", "vs CE (pts)", "align",
              "class align", "uniform", "isotropy", "eff. rank", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in sorted(rows, key=lambda r: (r["loss"] != "ce", r["loss"], r["batch_size"])):
        base = ce.get(r["batch_size"])
        gap = "-" if r["loss"] == "ce" or base is None else f"{100 * (r['test_top1'] - base):+.1f}"
        cells = [r["loss"], str(r["batch_size"]), str(r["contrast_rows"] or "-"), str(r["epochs"]), str(r["steps"]),
                 f"{100 * r['test_top1']:.1f}", gap, f"{r['alignment']:.3f}", f"{r['class_alignment']:.3f}",
                 f"{r['uniformity']:.3f}", f"{r['isotropy']:.3f}", f"{r['effective_rank']:.1f}",
                 f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_curve(rows: list, root: str, *, args, command: str, total_seconds: float) -> str:
    import csv

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "curve.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CURVE_COLUMNS) + ["model", "dataset", "world_size"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = format_curve_table(rows)
    first = rows[0]
    budget = ("the same number of steps at every batch size (--epochs epochs at --batch-size "
              f"{args.batch_size}, rounded up to whole epochs)" if args.match == "steps"
              else f"{args.epochs} epochs at every batch size")
    note = (f"{first['model_config']}; {first['dataset']}, world size {first['world_size']}, seed {args.seed}; "
            f"budget: {budget}; learning rate scaling: {args.lr_scale}. 'vs CE' is the top-1 difference to CE at the same "
            f"batch size, in percentage points. Total {total_seconds / 60:.1f} min.\n\n"
            f"Command:\n\n```\n{command}\n```")
    with open(os.path.join(root, "curve.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    plot_curve(rows, os.path.join(root, "curve.png"),
               title=f"{first['dataset']}, {'same steps' if args.match == 'steps' else 'same epochs'} at every batch size")
    return f"{table}\n\n{note}\nwritten to {root}/curve.csv, curve.md, curve.png"


def plot_curve(rows: list, path: str, *, title: str = "") -> None:
    """Test top-1, alignment and uniformity against batch size (log2 axis), one line per loss."""
    from .plots import _pyplot

    plt = _pyplot()
    panels = (("test_top1", "test top-1 (%)", 100.0), ("alignment", "alignment (lower is better)", 1.0),
              ("uniformity", "uniformity (lower is better)", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    sizes = sorted({r["batch_size"] for r in rows})
    for loss in losses:
        points = sorted((r["batch_size"], r) for r in rows if r["loss"] == loss)
        style = dict(color="black", linestyle="--", marker="s", label="ce (baseline)") if loss == "ce" \
            else dict(marker="o", label=loss)
        for ax, (key, _, scale) in zip(axes, panels):
            ax.plot([b for b, _ in points], [scale * r[key] for _, r in points], **style)
    for ax, (_, label, _) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size (images per step; 2 views each)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
