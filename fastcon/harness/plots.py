"""PNG plots of a run and of a comparison (matplotlib, headless)."""

from __future__ import annotations

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(history: list, path: str, *, title: str = "", final_top1: float | None = None) -> None:
    """Training loss per epoch, and test top-1 where measured: per evaluated epoch, and the
    final value (for LaCViT's SupCon, the only one: its classifier is trained in stage 2)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for stage, style in ((1, "-"), (2, "--")):
        points = [(r["epoch"], r["train_loss"]) for r in history if r.get("stage", 1) == stage]
        if points:
            ax_loss.plot(*zip(*points), style, label="stage 2: linear classifier" if stage == 2 else "training")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    points = [(r["epoch"], 100 * r["test_top1"]) for r in history if "test_top1" in r]
    if points:
        ax_acc.plot(*zip(*points), "o-", label="during training")
    last = max((r["epoch"] for r in history), default=0)
    two_stage = any(r.get("stage", 1) == 2 for r in history)
    # a one-stage run's final value is its last evaluated epoch's, already drawn
    if final_top1 is not None and (two_stage or not points or points[-1][0] != last):
        ax_acc.plot([last], [100 * final_top1], "*", markersize=14, color="tab:red",
                    label="after stage 2 (linear classifier)" if two_stage else "final")
        ax_acc.annotate(f"{100 * final_top1:.1f}", (last, 100 * final_top1), textcoords="offset points",
                        xytext=(0, -18), ha="center")
    if last:
        ax_acc.set_xlim(0, last + max(1.0, 0.05 * last))  # room for the last marker
    ax_acc.set_ylim(0, 105)
    ax_acc.set_yticks(range(0, 101, 20))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
    if ax_acc.lines:
        ax_acc.legend(loc="lower left")
    else:
        ax_acc.text(0.5, 0.5, "no test accuracy measured", ha="center", va="center", transform=ax_acc.transAxes)
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


def point_labels(rows: list, x: str, y: str, *, tolerance: float = 1e-9) -> list:
    """``[(x, y, text)]``: one label per distinct point; losses that land on the same point
    (``schane`` and ``clce`` are one objective built two ways) share one label, ``"schane = clce"``."""
    labels = []
    for r in rows:
        for i, (px, py, text) in enumerate(labels):
            if abs(px - r[x]) <= tolerance and abs(py - r[y]) <= tolerance:
                labels[i] = (px, py, f"{text} = {r['loss']}")
                break
        else:
            labels.append((r[x], r[y], r["loss"]))
    return labels


def comparison(rows: list, path: str) -> None:
    """Test top-1 per loss (the axis from 0 to 100 %, so that the bars' heights compare), and
    the alignment / uniformity plane of Wang & Isola with one label per point."""
    plt = _pyplot()
    fig, (ax_acc, ax_au) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["loss"] for r in rows]
    accuracy = [100 * r["test_top1"] for r in rows]
    bars = ax_acc.bar(names, accuracy, color="tab:blue")
    ax_acc.bar_label(bars, fmt="%.1f", padding=2)
    ax_acc.set_ylim(0, 110)
    ax_acc.set_yticks(range(0, 101, 20))
    ax_acc.set_ylabel("test top-1 (%)")
    texts = []
    for px, py, text in point_labels(rows, "uniformity", "alignment"):
        ax_au.scatter(px, py)
        texts.append(ax_au.annotate(text, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=9))
    ax_au.set_xlabel("uniformity (lower is better)")
    ax_au.set_ylabel("alignment (lower is better)")
    ax_au.margins(0.25)
    fig.tight_layout()
    _separate(fig, texts)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _separate(fig, texts, *, gap_px: float = 2.0, rounds: int = 50) -> None:
    """Move overlapping annotations apart vertically (in display pixels) until none overlap."""
    renderer = fig.canvas.get_renderer()
    for _ in range(rounds):
        moved = False
        boxes = [t.get_window_extent(renderer) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: boxes[i].y0)
        for a, b in zip(order, order[1:]):
            lower, upper = boxes[a], boxes[b]
            if lower.overlaps(upper):
                shift = lower.y1 + gap_px - upper.y0
                dx, dy = texts[b].xyann
                texts[b].xyann = (dx, dy + shift * 72.0 / fig.dpi)  # offset points
                moved = True
                boxes[b] = texts[b].get_window_extent(renderer)
        if not moved:
            return
