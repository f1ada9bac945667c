"""PNG plots of a run and of a comparison (matplotlib, headless)."""

from __future__ import annotations

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(history: list, path: str, *, title: str = "") -> None:
    """Training loss per epoch and, where measured, test top-1 per epoch."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for stage, style in ((1, "-"), (2, "--")):
        points = [(r["epoch"], r["train_loss"]) for r in history if r.get("stage", 1) == stage]
        if points:
            ax_loss.plot(*zip(*points), style, label="stage 2: linear classifier" if stage == 2 else "training")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    points = [(r["epoch"], r["test_top1"]) for r in history if "test_top1" in r]
    if points:
        ax_acc.plot(*zip(*points), "o-")
    else:
        ax_acc.text(0.5, 0.5, "accuracy only after stage 2\n(see final.json)", ha="center", va="center",
                    transform=ax_acc.transAxes)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def embedding_projection(features: torch.Tensor, labels: torch.Tensor, path: str, *, title: str = "") -> None:
    """The first two principal components of the L2-normalised embeddings, coloured by class."""
    plt = _pyplot()
    z = torch.nn.functional.normalize(features.double(), dim=1)
    z = z - z.mean(dim=0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    xy = (z @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10" if labels.max() < 10 else "tab20",
                         s=8, alpha=0.8)
    if labels.max() < 20:
        ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best", markerscale=0.8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparison(rows: list, path: str) -> None:
    """Test top-1 per loss, and the alignment / uniformity plane of Wang & Isola."""
    plt = _pyplot()
    fig, (ax_acc, ax_au) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["loss"] for r in rows]
    accuracy = [100 * r["test_top1"] for r in rows]
    bars = ax_acc.bar(names, accuracy, color="tab:blue")
    ax_acc.bar_label(bars, fmt="%.1f")
    ax_acc.set_ylim(max(0.0, min(accuracy) - 10), 100)
    ax_acc.set_ylabel("test top-1 (%)")
    for r in rows:
        ax_au.scatter(r["uniformity"], r["alignment"])
        ax_au.annotate(r["loss"], (r["uniformity"], r["alignment"]), textcoords="offset points", xytext=(4, 4))
    ax_au.set_xlabel("uniformity (lower is better)")
    ax_au.set_ylabel("alignment (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
