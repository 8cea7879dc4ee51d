"""Decoding WebDataset shards per batch: Pillow on the CPU (a thread per core) against
torchvision's decode_jpeg on `--device` (nvJPEG on a GPU), the same JPEG members side by side,
and how far their pixels differ (issue 20.4). Shards `--data` (default: 1,536 generated
320x240 JPEGs in 4 classes, so it runs where ../shared is absent) into a temporary folder first.

    python benchmarks/shard_decode.py --device cuda      # on a GPU machine (gpu_check.sh)
    python benchmarks/shard_decode.py --device cpu       # the same code path on the CPU
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transferlab import data, decoding
from transferlab.cli import main

p = argparse.ArgumentParser()
p.add_argument("--data", default=None, help="a dataset spec, e.g. folder:../shared/data/15-scene")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--size", type=int, default=224)
p.add_argument("--batch", type=int, default=256)
args = p.parse_args()
with tempfile.TemporaryDirectory() as tmp:
    if args.data is None:
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(1536):
            folder = Path(tmp) / "jpegs" / ("train" if i % 3 else "test") / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(folder / f"{i}.jpg")
        args.data = f"folder:{Path(tmp) / 'jpegs'}"
    assert main(["--quiet", "data", "shard", args.data, "--out", f"{tmp}/wds"]) == 0
    split = data.load(f"wds:{Path(tmp) / 'wds'}").splits["test"]
    lazy = decoding.decode(split, args.size, 3, "bilinear", lazy=True)
    n = len(split) // args.batch * args.batch
    batches = [lazy[i : i + args.batch] for i in range(0, n, args.batch)]
    for b in batches:
        b.device = args.device
    batches[0].tensor()  # warm-up (CUDA context, nvJPEG handles)
    t0 = time.perf_counter()
    cpu = [np.asarray(b) for b in batches]
    t1 = time.perf_counter()
    dev = [b.tensor() for b in batches]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    diff = np.abs(np.concatenate(cpu).astype(int) - torch.cat(dev).cpu().numpy().astype(int))
    print(
        f"{n} images at {args.size} px, batches of {args.batch}: Pillow (CPU) {n / (t1 - t0):.0f}"
        f" img/s, torchvision on {args.device} {n / (t2 - t1):.0f} img/s, "
        f"ratio={(t1 - t0) / (t2 - t1):.2f}; |diff| mean {diff.mean():.3f}, max {diff.max()}"
    )
