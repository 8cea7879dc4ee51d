"""Figures as PNG files: training curves and confusion matrices (matplotlib, no display)."""

from __future__ import annotations

import logging
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .checkpoint import atomic_path  # noqa: E402

# Class names in any script: DejaVu Sans first, then whichever of these fonts is installed
# (matplotlib falls back along font.family per glyph); a glyph none has is one note per process
# (matplotlib warned per character, figure and layout pass: 16 lines for two class names).
FALLBACK_FONTS = (
    "Noto Sans",
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Color Emoji",
    "Symbola",
)
# mathtext (a log axis's 10^-3) looks up fonts a slim install lacks (cmex10, STIXGeneral) and
# falls back to DejaVu Sans, logging each miss ("findfont: ...") past --quiet: a missing glyph
# is said once, below, instead.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
_installed = {f.name for f in matplotlib.font_manager.fontManager.ttflist}
matplotlib.rcParams["font.family"] = [
    "DejaVu Sans",
    *(f for f in FALLBACK_FONTS if f in _installed),
]
_NOTED: set[str] = set()


def _plain(text: str) -> str:
    """A name drawn as written: matplotlib reads text between two $ as math (a class named
    "$5-$10" was drawn "5 − 10", and "x $\\frac{ y $" stopped evaluate with a traceback)."""
    return str(text).replace("$", r"\$")


def _title(text: str, inches: float, points: float = 12) -> str:
    """A title as written, wrapped to 3/4 of its figure's width (a data path cut it off)."""
    return textwrap.fill(_plain(text), max(20, int(0.75 * inches * 72 / (0.6 * points))))


def _note_missing_glyphs(fig) -> None:
    """Say once which characters of a figure's text no font of ours has (drawn as boxes)."""
    from matplotlib.font_manager import FontProperties, findfont, get_font

    fonts = [
        get_font(findfont(FontProperties(family=f))) for f in matplotlib.rcParams["font.family"]
    ]
    chars = {c for t in fig.findobj(matplotlib.text.Text) for c in t.get_text()} - _NOTED
    lacking = sorted(
        c for c in chars if c.isprintable() and not any(ord(c) in f.get_charmap() for f in fonts)
    )
    if lacking:
        _NOTED.update(lacking)
        warnings.warn(
            f"no font here has {' '.join(lacking)}: the plots show them as empty boxes (install a "
            f"font that has them: {', '.join(FALLBACK_FONTS[1:])} are used when installed)",
            stacklevel=3,
        )


def curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy, train vs val: the reference report's two figures side by side. A
    linear probe's rows are the L2 strengths it fitted, not epochs: drawn against them."""
    probe = bool(history) and all("l2" in r for r in history)
    xs = [r["l2"] if probe else r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "top-1 accuracy")):
        ax.plot(xs, [r[f"train_{key}"] for r in history], "o-", ms=3, label="train")
        ax.plot(xs, [r[f"val_{key}"] for r in history], "o-", ms=3, label="val")
        ax.set_xlabel("probe L2 strength (standardised features)" if probe else "epoch")
        ax.set_xscale("log" if probe else "linear")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_title(title, 10))
    fig.set_layout_engine("tight")  # laid out as it is drawn (`_draw`)
    _save(fig, path)


def confusion(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix as a PNG file."""
    _save(confusion_figure(matrix, names, title), path)


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
    ax.set_title(_title(title, 6))
    fig.set_layout_engine("tight")  # laid out as it is drawn (`_draw`)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        _draw(fig, tmp, 100)


def _draw(fig, target, dpi: int) -> None:
    """Lay out, draw and close `fig` into `target` (a path or a file object), as PNG."""
    _note_missing_glyphs(fig)
    with warnings.catch_warnings():  # one per missing glyph, figure and pass: noted above
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig.savefig(target, format="png", dpi=dpi, metadata={"Software": SOFTWARE})
    plt.close(fig)


SOFTWARE = f"transferlab (matplotlib {matplotlib.__version__})"  # each figure's PNG says it


def drawn_here(path: Path) -> bool:
    """A figure transferlab drew (its PNG says so): one a user made with matplotlib under the
    same name (confusion.png) says matplotlib alone, and is never drawn over."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(im.info.get("Software", "")).startswith("transferlab")
    except (OSError, ValueError):
        return False


def save_image(image: np.ndarray, path: Path, title: str) -> None:
    """One uint8 image (H, W, 3) with a title, as a PNG (a small image shown larger)."""
    fig, ax = plt.subplots(figsize=(3.2, 3.5))
    ax.imshow(image, interpolation="nearest")
    ax.axis("off")
    ax.set_title(_title(title, 3.2, 7), fontsize=7)
    fig.set_layout_engine("tight")  # laid out as it is drawn (`_draw`)
    _save(fig, path)


# ----------------------------------------------------------------------------- report figures


def png(fig) -> bytes:
    """A figure as PNG bytes (for embedding), closed afterwards."""
    import io

    buf = io.BytesIO()
    _draw(fig, buf, 90)
    return buf.getvalue()


def confusion_figure(matrix: np.ndarray, names: list[str], title: str):
    """Row-normalised confusion matrix; class names on the axes when there are few enough,
    the rates in the cells when there are very few."""
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    k = len(names)
    size = min(4 + 0.35 * k, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        short = [_plain(n.split(",")[0][:18]) for n in names]
        ax.set_xticks(range(k), short, rotation=90, fontsize=8)
        ax.set_yticks(range(k), short, fontsize=8)
    for i, j in zip(*np.nonzero(matrix), strict=True) if k <= 15 else ():
        color = "white" if norm[i, j] > 0.5 else "black"
        ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(_title(title, size))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.set_layout_engine("tight")  # laid out as it is drawn (`_draw`)
    return fig


def reliability_figure(confidence: np.ndarray, correct: np.ndarray, ece: float, bins: int = 15):
    """Accuracy against confidence per bin (the diagonal is perfect calibration)."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    acc = [correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)]
    count = np.bincount(idx, minlength=bins)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.bar(
        edges[:-1], acc, width=1 / bins, align="edge", edgecolor="k", alpha=0.8, label="accuracy"
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect")
    ax2 = ax.twinx()
    ax2.plot(edges[:-1] + 0.5 / bins, count / max(count.sum(), 1), "C3.-", ms=3, lw=1)
    ax2.set_ylabel("share of images", color="C3", fontsize=8)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability, ECE {ece:.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.set_layout_engine("tight")  # laid out as it is drawn (`_draw`)
    return fig


def per_class_figure(accuracy: np.ndarray, names: list[str]):
    k = len(names)
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * k, 12), 3))
    ax.bar(range(k), accuracy, color="C0")
    if k <= 60:
        ax.set_xticks(
            range(k), [_plain(n.split(",")[0][:14]) for n in names], rotation=90, fontsize=7
        )
    ax.set_ylim(0, 1)
    ax.set_ylabel("test top-1")
    ax.set_title("per-class accuracy", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.set_layout_engine("tight")  # laid out as it is drawn (`_draw`)
    return fig


def gain_figure(labels: list[str], values: list[float], is_ensemble: list[bool], title: str):
    """Test top-1 of members and ensembles, side by side."""
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 1.5), 3.4))
    colors = ["C1" if e else "C0" for e in is_ensemble]
    ax.bar(range(len(labels)), [100 * v for v in values], color=colors)
    for i, v in enumerate(values):
        ax.text(i, 100 * v, f"{100 * v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        range(len(labels)), [_plain(x) for x in labels], rotation=45, ha="right", fontsize=7
    )
    low = 100 * min(values)
    ax.set_ylim(max(0, low - 10), min(100, 100 * max(values) + 3))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(_title(title, max(4, 0.6 * len(labels) + 1.5), 9), fontsize=9)
    fig.set_layout_engine("tight")  # laid out as it is drawn (`_draw`)
    return fig


def wrong_grid_figure(images: np.ndarray, captions: list[str], title: str):
    n = len(images)
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    width = max(2.0 * cols, 6.0)  # one or two images: room for the title
    fig, axes = plt.subplots(rows, cols, figsize=(width, 2.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, cap in zip(axes.ravel(), images, captions, strict=False):
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(_plain(cap), fontsize=6.5)
    fig.suptitle(_title(title, width, 9), fontsize=9)
    fig.set_layout_engine("tight", h_pad=1.2)
    return fig
