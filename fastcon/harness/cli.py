"""``fastcon finetune`` and ``fastcon compare``.

Multi-process: ``torchrun --nproc-per-node 2 -m fastcon finetune ...`` (DDP; gloo on CPU,
NCCL on CUDA; ``--batch-size`` is per process and the contrastive losses contrast every
rank's anchors against the rows of all ranks).
"""

from __future__ import annotations

import argparse
import os
import time

from .config import AUGMENT_HELP, AUGMENTS, PRESET_HELP, PRESETS
from .data import DATASET_HELP
from .recipes import LOSSES

COMPARE_COLUMNS = ("loss", "test_top1", "alignment", "class_alignment", "uniformity", "isotropy",
                   "effective_rank", "train_seconds", "peak_rss_mb")

TORCHRUN_NOTE = ("Several processes: torchrun --nproc-per-node 2 -m %(prog)s ... (DDP: gloo on CPU, NCCL "
                 "on CUDA; --batch-size is per process; contrastive losses contrast against every rank's rows). "
                 "Outputs: metrics.jsonl (per epoch), final.json, model.safetensors + model.json, curves.png, "
                 "embeddings.png (PCA of the test embeddings).")

VIEWS_NOTE = ("Contrastive recipes see two views of every image from two independent random augmentations "
              "(the SCHaNe reference code feeds the same crop twice; fastcon does not).")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not ``None`` or a flag's ``False``, and
    not where the help text already describes the default in words."""

    def _get_help_string(self, action):
        described = any(words in (action.help or "") for words in ("Default:", "(default "))
        if action.default is None or action.default is False or described:
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    finetune = subparsers.add_parser(
        "finetune", help="fine-tune a timm model with one loss",
        description="Fine-tune a timm model with cross-entropy or a contrastive recipe. " + VIEWS_NOTE,
        epilog=TORCHRUN_NOTE,
        formatter_class=HelpFormatter)
    finetune.add_argument("--loss", choices=LOSSES, default="ce",
                          help="ce: cross-entropy; supcon: LaCViT (SupCon stage, then a linear classifier on "
                               "frozen features); schane: alpha*SCHaNe + (1-alpha)*CE; clce: the same through "
                               "CLCELoss; core: Core-tuning (hard-pair mixup, focal SupCon)")
    _add_common(finetune, out_help="output directory (default runs/<timestamp>-<loss>)")
    finetune.set_defaults(func=run_finetune)

    compare = subparsers.add_parser(
        "compare", help="fine-tune with several losses on the same data, seed and budget; print one table",
        description="Run each loss with the same data, seed and budget, then print one table and write it as "
                    "CSV and Markdown with a plot. " + VIEWS_NOTE,
        epilog=TORCHRUN_NOTE,
        formatter_class=HelpFormatter)
    compare.add_argument("--losses", default=",".join(LOSSES), help="comma-separated losses to compare")
    _add_common(compare, out_help="output directory: compare.csv, compare.md, compare.png and one folder per loss "
                                  "(default runs/<timestamp>-compare)")
    compare.set_defaults(func=run_compare)


def _add_common(p: argparse.ArgumentParser, *, out_help: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--dataset", default="digits", metavar="SPEC", help=DATASET_HELP)
    g.add_argument("--preset", choices=tuple(PRESETS) + ("none",), default=None, help=PRESET_HELP)
    g.add_argument("--model", default=None,
                   help="any timm model name, optionally with a pretrained tag whose normalisation to use "
                        "(e.g. resnet50.a1_in1k); created with pretrained=False. Default: the preset's, else "
                        "vit_tiny_patch16_224")
    g.add_argument("--model-args", default=None, metavar="K=V,...",
                   help="timm.create_model keyword arguments; '' keeps the registered architecture. Default: the "
                        "preset's for its own model, else none")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local timm checkpoint (.pth/.bin/.safetensors) to start from; keys that do not fit "
                        "(e.g. the old head) are dropped with a message. Nothing is downloaded.")
    g.add_argument("--img-size", type=int, default=None, metavar="PX",
                   help="model input size in pixels (images are resized, ViTs built for it). Default: the "
                        "preset's, else the model's own (timm's pretrained_cfg)")
    g.add_argument("--augment", choices=AUGMENTS, default=None, help=AUGMENT_HELP)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA: batch norm statistics over every process's rows (SyncBatchNorm)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (torch.set_num_threads; 0 keeps torch's default). One is "
                        "fastest for the digits preset's small ViT, above all on a shared machine")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data order and the augmentations (the digits' "
                        "train/test split is fixed)")
    g.add_argument("--out", default=None, help=out_help)
    g.add_argument("--quiet", action="store_true",
                   help="no progress (progress is bars on a terminal, else one line per epoch)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=25, help="training epochs (supcon: of its contrastive stage)")
    g.add_argument("--batch-size", type=int, default=64, help="images per step (per process); each gives 2 views")
    g.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warm-up, then cosine)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    g.add_argument("--eval-every", type=int, default=5, help="epochs between test evaluations")
    g.add_argument("--chunk-size", type=_positive_int, default=None, metavar="ROWS",
                   help="gradient caching (fastcon.GradCache): run the network on this many rows (views) at a "
                        "time, twice, for the exact whole-batch gradients with one chunk's activation memory; "
                        "not for core. Default: off")
    g.add_argument("--linear-epochs", type=int, default=50, help="supcon stage 2: epochs of the linear classifier")
    g.add_argument("--linear-lr", type=float, default=1e-2, help="supcon stage 2: learning rate")

    g = p.add_argument_group("loss hyper-parameters (defaults from docs/semantics.md)")
    g.add_argument("--temperature", type=float, default=0.07, help="t of every contrastive loss")
    g.add_argument("--base-temperature", type=float, default=0.07, help="t_base of supcon and core (focal)")
    g.add_argument("--beta", type=float, default=1.0, help="SCHaNe / CLCE hard-negative concentration")
    g.add_argument("--alpha", type=float, default=0.5, help="schane / clce: weight of the contrastive term")
    g.add_argument("--eta", type=float, default=0.1, help="core: weight of the focal contrastive term")
    g.add_argument("--gamma", type=float, default=1.0, help="core: focal exponent")
    g.add_argument("--mix-alpha", type=float, default=1.0, help="core: mixup coefficient lam ~ Beta(a, a)")
    g.add_argument("--proj-dim", type=int, default=128, help="output size of the projection head")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _unchunkable(args, losses) -> str | None:
    """The error message when --chunk-size is asked of a recipe that cannot be chunked."""
    from .recipes import RECIPES

    refused = [name for name in losses if not RECIPES[name].chunkable]
    if getattr(args, "chunk_size", None) and refused:
        return (f"--chunk-size does not work with {', '.join(refused)}: its heads mix rows across the whole "
                "batch (hard-pair mining, mixup), so running them chunk by chunk would change the objective")
    return None


def _default_out(kind: str) -> str:
    return os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}")


def _fail(message: str) -> int:
    import sys

    print(f"fastcon: error: {message}", file=sys.stderr)
    return 2


def _end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_finetune(args) -> int:
    from .config import UsageError
    from .train import finetune

    if (message := _unchunkable(args, [args.loss])) is not None:
        return _fail(message)
    args.out = args.out or _default_out(args.loss)
    try:
        finetune(args)
    except (UsageError, FileNotFoundError) as exc:
        return _fail(str(exc))
    finally:
        _end_distributed()
    return 0


def run_compare(args) -> int:
    from .config import UsageError
    from .train import finetune

    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    unknown = [name for name in losses if name not in LOSSES]
    if unknown or not losses:
        return _fail(f"--losses: unknown {unknown}; choose from {','.join(LOSSES)}")
    if (message := _unchunkable(args, losses)) is not None:
        return _fail(message)
    root = args.out or _default_out("compare")
    rows = []
    started = time.time()
    try:
        for name in losses:
            run_args = argparse.Namespace(**{**vars(args), "loss": name, "out": os.path.join(root, name)})
            rows.append(finetune(run_args))
    except (UsageError, FileNotFoundError) as exc:
        return _fail(str(exc))
    finally:
        _end_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(write_comparison(rows, root, total_seconds=time.time() - started))
    return 0


def format_table(rows: list) -> str:
    """A Markdown table of the compare columns (also what ``compare`` prints)."""
    header = ["loss", "top-1 %", "align", "class align", "uniform", "isotropy", "eff. rank", "train s",
              "peak RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["loss"], f"{100 * r['test_top1']:.1f}", f"{r['alignment']:.3f}", f"{r['class_alignment']:.3f}",
                 f"{r['uniformity']:.3f}", f"{r['isotropy']:.3f}", f"{r['effective_rank']:.1f}",
                 f"{r['train_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(rows: list, root: str, *, total_seconds: float) -> str:
    import csv

    from . import plots

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "compare.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COMPARE_COLUMNS) + ["model", "dataset", "epochs", "world_size"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = format_table(rows)
    first = rows[0]
    note = (f"{first['model_config']}; {first['dataset']}, {first['epochs']} epochs, world size {first['world_size']}; "
            f"total {total_seconds / 60:.1f} min. Peak RSS is the process's peak so far (runs share one process).")
    with open(os.path.join(root, "compare.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    plots.comparison(rows, os.path.join(root, "compare.png"))
    return f"{table}\n\n{note}\nwritten to {root}/compare.csv, compare.md, compare.png"
