"""Whole-epoch training throughput, side by side in one process: transferlab vs a tutorial loop.

ResNet-50 at 64 px on a class-balanced subset of the shared Tiny ImageNet (data + model):
  (a) transferlab: decode once (memory-mapped cache), batched uint8 crop/flip, the precision
      `auto` picks, channels_last, the real train_one_epoch();
  (b) tutorial: per-image PIL decode + torchvision transforms every epoch, fp32, NCHW, with
      DataLoader num_workers 0 and 2 (the better counts);
  (c) ceiling: the same model and precision as (a) on batches already in memory.
The process first warms up both precisions (`warm_up`), so no variant pays for the kernels
another one then reuses.
Prints every epoch's time and img/s, then `ratio=` (a over the better b) and `ceiling=` (a
over c) as its last two lines.

    python benchmarks/train_throughput.py [--images 2000] [--epochs 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from common import (
    PathsDataset,
    cpu_kind,
    seed_all,
    timed,
    tiny_subset,
    transferlab_loop,
    tutorial_transform,
)
from tqdm import tqdm

from transferlab import batching, decoding, evaluate, trainer
from transferlab.config import make_config


def make_model(channels_last: bool):
    seed_all()
    model = timm.create_model("resnet50", num_classes=200)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return model, opt


def run_transferlab(split, args, cache: Path) -> list[float]:
    cfg = make_config({"batch_size": args.batch, "lr": 1e-3, "schedule": "constant"})
    model, opt = make_model(channels_last=True)
    aug = batching.Augment(crop="pad", pad=args.size // 8, flip=True)
    loop = transferlab_loop(model, opt, aug, cfg)
    times = []
    for epoch in range(1, args.epochs + 1):

        def one_epoch(epoch=epoch):
            images = decoding.decode(
                split, args.size, 3, cache=cache, quiet=True
            )  # cached after 1st
            batches = batching.loader(images, split.labels, args.batch, 0, epoch, shuffle=True)
            params = aug.params(len(split), args.size, 0, epoch)
            trainer.train_one_epoch(
                loop, tqdm(batches, disable=True), params, trainer.Progress(), lambda *_, **__: None
            )

        times.append(timed(one_epoch)[0])
    return times


def run_tutorial(split, args, workers: int) -> list[float]:
    model, opt = make_model(channels_last=False)
    ds = PathsDataset(split, tutorial_transform(args.size, train=True))
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    times = []
    for _ in range(args.epochs):

        def one_epoch():
            model.train()
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        times.append(timed(one_epoch)[0])
    return times


def run_ceiling(n: int, args) -> list[float]:
    precision = evaluate.resolve_precision("auto")
    model, opt = make_model(channels_last=True)
    batches = [
        (
            torch.randn(min(args.batch, n - i), 3, args.size, args.size).contiguous(
                memory_format=torch.channels_last
            ),
            torch.randint(0, 200, (min(args.batch, n - i),)),
        )
        for i in range(0, n, args.batch)
    ]
    times = []
    for _ in range(args.epochs):

        def one_epoch():
            model.train()
            for x, y in batches:
                with evaluate.autocast(precision):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        times.append(timed(one_epoch)[0])
    return times


def warm_up(args) -> None:
    """A few training steps at each precision before anything is timed: oneDNN generates its
    kernels on first use, once per process, and whichever variant ran first paid for them
    (transferlab's first epoch: 42.7 img/s, its second 65.7, bf16 on a 2-core EPYC)."""
    precision = evaluate.resolve_precision("auto")
    for p in {precision, "fp32"}:
        for channels_last in (True, False):
            model, opt = make_model(channels_last)
            x = torch.randn(args.batch, 3, args.size, args.size)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            for _ in range(3):
                with evaluate.autocast(p):
                    loss = F.cross_entropy(model(x).float(), torch.zeros(args.batch).long())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def report(name: str, times: list[float], n: int) -> float:
    for e, t in enumerate(times, 1):
        print(f"{name:<28} epoch {e}: {t:7.1f} s  {n / t:6.1f} img/s", flush=True)
    return 2 * n / sum(times) if len(times) == 2 else n / times[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="training images (of 20,000)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    split = tiny_subset("train", args.images)
    n = len(split)
    print(cpu_kind())
    print(
        f"ResNet-50 {args.size}px, {n} Tiny ImageNet images, batch {args.batch}, "
        f"{args.epochs} epochs, {torch.get_num_threads()} threads, "
        f"precision auto -> {evaluate.resolve_precision('auto')}",
        flush=True,
    )
    warm_up(args)
    with tempfile.TemporaryDirectory() as cache:
        a = report("a transferlab", run_transferlab(split, args, Path(cache)), n)
    b0 = report("b tutorial, 0 workers", run_tutorial(split, args, 0), n)
    b2 = report("b tutorial, 2 workers", run_tutorial(split, args, 2), n)
    c = report("c ceiling (in-memory)", run_ceiling(n, args), n)
    print(f"img/s over all epochs: a {a:.1f}, b0 {b0:.1f}, b2 {b2:.1f}, c {c:.1f}")
    print(f"ratio={a / max(b0, b2):.2f}")
    print(f"ceiling={a / c:.2f}")


if __name__ == "__main__":
    main()
