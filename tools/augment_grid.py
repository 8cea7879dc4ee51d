"""Save a grid of batched-augmented training samples, to check the augmentation by eye.

    python tools/augment_grid.py tiny-imagenet:../shared/data/tiny-imagenet-200 --size 64 \
        --crop rrc --out docs/augment-grid.png
Each row: one image, original first, then 7 epochs of its augmentation.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from transferlab import batching, data, decoding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--crop", default="pad", choices=("pad", "rrc", "none"))
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--out", default="augment-grid.png")
    args = p.parse_args()
    ds = data.load(args.data, limit=args.rows * 20)
    split = ds.splits["train"].subset(np.arange(args.rows))
    images = torch.from_numpy(decoding.decode(split, args.size, 3, cache=None))  # (R, H, W, C)
    aug = batching.Augment(crop=args.crop, pad=args.size // 8, flip=True)
    idx = torch.arange(args.rows)
    columns = [images] + [
        aug(
            images,
            {k: v[idx] for k, v in aug.params(args.rows, args.size, seed=0, epoch=e).items()},
        )
        for e in range(1, 8)
    ]
    grid = torch.cat([torch.cat(list(col), dim=0) for col in columns], dim=1)  # (R*H, 8*W, C)
    Image.fromarray(grid.numpy()).resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST
    ).save(args.out)
    print(f"{args.rows} images x 8 columns ({args.crop}) -> {args.out}")


if __name__ == "__main__":
    main()
