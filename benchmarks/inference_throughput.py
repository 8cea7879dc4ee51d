"""Test-set evaluation of a 3-member ensemble with different input sizes, side by side.

Members: ResNet-50 at 64 px RGB, EfficientNet-Lite0 at 128 px RGB, the DCNN at 32 px grayscale.
  transferlab: each distinct input size decoded once (cold memory-mapped cache, timed), batched
               predict() with the precision `auto` picks and channels_last;
  naive:       each member alone through its own ImageFolder-style PIL pipeline, fp32, NCHW,
               the better of DataLoader num_workers 0 and 2.
Last line: `ratio=` (naive time over transferlab time).

    python benchmarks/inference_throughput.py [--images 2000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import PathsDataset, seed_all, timed, tiny_subset, tutorial_transform

from transferlab import decoding, evaluate, models

MEMBERS = [("resnet50", 64, 3), ("tf_efficientnet_lite0", 128, 3), ("dcnn", 32, 1)]


def build(arch: str, channels: int, channels_last: bool):
    seed_all()
    model = models.create(arch, 200, channels).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def run_transferlab(split, cache: Path) -> float:
    precision = evaluate.resolve_precision("auto")

    def everything():

        for arch, size, channels in MEMBERS:
            images = decoding.decode(split, size, channels, "bilinear", cache=cache, quiet=True)
            prep = models.Preprocessing.make(size, channels, [0.5] * channels, [0.5] * channels)
            evaluate.predict(build(arch, channels, True), images, prep, precision, 256)

    return timed(everything)[0]


@torch.no_grad()
def run_naive(split, workers: int) -> float:
    def everything():
        for arch, size, channels in MEMBERS:
            model = build(arch, channels, False)
            ds = PathsDataset(split, tutorial_transform(size, train=False, gray=channels == 1))
            for x, _ in torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers):
                model(x)

    return timed(everything)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="test images (of 10,000)")
    args = p.parse_args()
    split = tiny_subset("test", args.images)
    n = len(split)
    print(
        f"{len(MEMBERS)} members {MEMBERS}, {n} Tiny ImageNet test images, "
        f"{torch.get_num_threads()} threads, precision auto -> "
        f"{evaluate.resolve_precision('auto')}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as cache:
        t_a = run_transferlab(split, Path(cache))
    print(f"transferlab            {t_a:7.1f} s  {n / t_a:6.1f} img/s (all members)", flush=True)
    naive = {}
    for workers in (0, 2):
        naive[workers] = run_naive(split, workers)
        print(
            f"naive, {workers} workers        {naive[workers]:7.1f} s  "
            f"{n / naive[workers]:6.1f} img/s (all members)",
            flush=True,
        )
    print(f"ratio={min(naive.values()) / t_a:.2f}")


if __name__ == "__main__":
    main()
