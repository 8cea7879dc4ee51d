"""Shared pieces of the benchmark scripts: the data subset and the tutorial-style pipeline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision import transforms as T

from transferlab import batching, data, decoding, evaluate, models, strategies, trainer
from transferlab.distributed import Dist

SHARED_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200"


def tiny_subset(split: str, images: int) -> data.Split:
    """`images` images of a Tiny ImageNet split, spread over the classes (fixed seed)."""
    if not SHARED_TINY.is_dir():
        raise SystemExit(f"needs the shared Tiny ImageNet at {SHARED_TINY}")
    ds = data.load(f"tiny-imagenet:{SHARED_TINY}")
    whole = ds.splits[split]
    return whole.subset(data.stratified_head(whole.labels, images))


class PathsDataset(torch.utils.data.Dataset):
    """What tutorials do: open the JPEG with PIL and run torchvision transforms, every epoch."""

    def __init__(self, split: data.Split, transform):
        self.paths, self.labels, self.transform = split.paths, split.labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(torchvision.datasets.folder.default_loader(self.paths[i])), int(
            self.labels[i]
        )


def tutorial_transform(size: int, train: bool, gray: bool = False):
    steps = [T.Grayscale()] if gray else []
    steps += [T.Resize(size), T.CenterCrop(size)]
    if train:
        steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    c = 1 if gray else 3
    return T.Compose([*steps, T.ToTensor(), T.Normalize([0.5] * c, [0.5] * c)])


def cpu_kind() -> str:
    """The CPU's model name and its bf16 features, for every figure a benchmark prints."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return f"{platform.processor() or platform.machine()} (no /proc/cpuinfo)"
    name = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
        "?",
    )
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in text})
    return f"{name}, {decoding.cores()} cores, {' + '.join(flags) if flags else 'no native bf16 (AVX2 or AVX512 only)'}"


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def transferlab_loop(model, opt, aug: batching.Augment, cfg) -> trainer.Loop:
    """transferlab's training objects for a bare model: RGB, [-1, 1] inputs, `auto` precision."""
    loop = trainer.Loop(
        cfg,
        Dist(),
        model,
        models.Architecture("bench"),
        models.Preprocessing.make(64, 3, [0.5] * 3, [0.5] * 3),  # (the size is not used here)
        evaluate.resolve_precision("auto"),
        aug,
    )
    loop.ddp, loop.optimizer = models.Forward(model, loop.precision), opt
    loop.scheduler = strategies.make_scheduler(cfg, opt, 1)
    loop.scaler = torch.amp.GradScaler("cpu", enabled=False)
    return loop
