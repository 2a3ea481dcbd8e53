"""The run's pictures, drawn by rank 0 at the end: learning curves, and the confusion matrix
(classification) or predicted against true values (regression).

Drawing only: run_dir.py names the files and writes them. Files only (matplotlib's Agg
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


def curves(history: Dict[str, List[float]], path: str, title: str = "", metric: str = "accuracy") -> None:
    """Loss and ``metric`` (accuracy, or RMSE for regression) per epoch, training vs validation,
    and the learning rate: 1200 x 400 px."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=100)
    epochs = np.arange(1, len(next(iter(history.values()), [])) + 1)
    for ax, name in zip(axes[:2], ("loss", metric)):
        for key, label, style in ((name, "train", "-"), (f"val_{name}", "validation", "--")):
            if history.get(key):
                ax.plot(epochs, history[key], style, label=label)
        ax.set_title(name)
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


def predicted_vs_true(points: np.ndarray, path: str, target_name: str, title: str = "") -> None:
    """Predicted against true values (rows of ``points``: true, predicted), with the diagonal: 600 x 600 px."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    points = np.asarray(points, np.float64).reshape(-1, 2)
    ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.5)
    if len(points):
        low, high = float(points.min()), float(points.max())
        ax.plot([low, high], [low, high], color="tab:red", linewidth=1, label="predicted = true")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"true {target_name}")
    ax.set_ylabel(f"predicted {target_name}")
    ax.grid(alpha=0.3)
    ax.set_title(title or "predicted vs true", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
