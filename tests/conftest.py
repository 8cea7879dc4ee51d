"""Synthetic image datasets made on the fly, tiny models, and the shared-data skip rule."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
torch.set_num_threads(min(2, os.cpu_count() or 1))


_TEMP_CACHE: str | None = None


def pytest_configure(config):
    """Tests never write to the user's ~/.cache: the decoded-image cache goes to a temp dir."""
    global _TEMP_CACHE
    import tempfile

    if "TRANSFERLAB_CACHE" not in os.environ:
        _TEMP_CACHE = os.environ["TRANSFERLAB_CACHE"] = tempfile.mkdtemp(
            prefix="transferlab-cache-"
        )


def pytest_unconfigure(config):
    """...and that temp dir goes when the session ends (CI machines have little disk to spare)."""
    if _TEMP_CACHE is not None:
        import shutil

        shutil.rmtree(_TEMP_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


COLORS = [
    (200, 40, 40),
    (40, 200, 40),
    (40, 40, 200),
    (200, 200, 40),
    (200, 40, 200),
    (40, 200, 200),
    (230, 230, 230),
    (120, 120, 120),
]


def make_image(cls: int, i: int, size: int = 24, mode: str = "RGB") -> Image.Image:
    """A learnable synthetic image: the class is the colour of a central square (flip-proof)."""
    rng = np.random.default_rng(cls * 1000 + i)
    arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    q = size // 4
    arr[q : size - q, q : size - q] = COLORS[cls % len(COLORS)]
    return Image.fromarray(arr).convert(mode)


def make_folder(
    root: Path,
    classes: list[str],
    per_class: int,
    size: int = 24,
    subsets: tuple[str, ...] = ("train", "test"),
    first: int = 0,
) -> Path:
    """A folder dataset: root/<subset>/<class>/<i>.png (or root/<class>/... with no subsets)."""
    for s_i, subset in enumerate(subsets or ("",)):
        for c_i, name in enumerate(classes):
            d = root / subset / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                make_image(c_i, first + i + 100 * s_i, size).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def folder_data(tmp_path_factory) -> Path:
    """4 classes, 30 train + 10 test images each, 24x24 RGB."""
    root = tmp_path_factory.mktemp("folder")
    make_folder(root / "train", ["a", "b", "c", "d"], 30, subsets=("",))
    make_folder(root / "test", ["a", "b", "c", "d"], 10, subsets=("",), first=50)  # not copies
    # of train's images (they were, byte for byte: a test score that was no held-out score)
    return root


def tiny_cfg(data: str, **kw):
    """A config that trains a tiny timm ResNet in about a second."""
    from transferlab.config import make_config

    base = {
        "data": data,
        "model": "test_resnet",
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.01,
        "input_size": 24,
        "precision": "fp32",
        **kw,
    }
    return make_config(base, check_applies=kw)  # (a probe takes no epochs, batch size or lr)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, folder_data) -> Path:
    """One finished run of a tiny ResNet on the synthetic folder data."""
    from transferlab.trainer import fit

    out = tmp_path_factory.mktemp("runs") / "tiny"
    fit(tiny_cfg(f"folder:{folder_data}", epochs=3), out, quiet=True)
    return out
