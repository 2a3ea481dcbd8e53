"""The run's pictures, drawn by rank 0 at the end: learning curves and the confusion matrix.

Drawing only: outputs.py names the files and writes them. Files only (matplotlib's Agg
backend), never a window; fixed sizes so they embed predictably.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display (also hvd-bench's plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(history: Dict[str, List[float]], path: str, title: str = "") -> None:
    """Loss and accuracy per epoch, training vs validation, and the learning rate: 1200 x 400 px."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=100)
    epochs = np.arange(1, len(next(iter(history.values()), [])) + 1)
    for ax, metric in zip(axes[:2], ("loss", "accuracy")):
        for key, label, style in ((metric, "train", "-"), (f"val_{metric}", "validation", "--")):
            if history.get(key):
                ax.plot(epochs, history[key], style, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if history.get("lr"):
        axes[2].plot(epochs, history["lr"], color="tab:green")
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion(counts: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> None:
    """The confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    plt = pyplot()
    n = len(class_names)
    side = min(12.0, max(4.0, 0.6 * n + 2.5))
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), [str(c) for c in class_names], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [str(c) for c in class_names], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    high = counts.max() / 2 if counts.size else 0
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > high else "black")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
