"""Figures as PNG files: training curves and confusion matrices (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .checkpoint import atomic_path  # noqa: E402


def curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy, train vs val: the reference report's two figures side by side."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "top-1 accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", ms=3, label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", ms=3, label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def confusion(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix; class names on the axes when there are few enough."""
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    k = len(names)
    size = min(4 + 0.35 * k, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        short = [n.split(",")[0][:18] for n in names]
        ax.set_xticks(range(k), short, rotation=90, fontsize=8)
        ax.set_yticks(range(k), short, fontsize=8)
        if k <= 15:
            for i in range(k):
                for j in range(k):
                    if matrix[i, j]:
                        ax.text(
                            j,
                            i,
                            f"{norm[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def lr_find(lrs: list[float], losses: list[float], suggested: float, path: Path, title: str):
    """The LR range test: smoothed loss against a log-scale LR, the suggestion marked."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(lrs, losses)
    ax.axvline(suggested, color="C3", ls="--", label=f"suggested {suggested:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    finite = [v for v in losses if np.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * min(finite)) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
