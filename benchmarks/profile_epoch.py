"""Where an epoch of transferlab training goes on this machine, measured with torch.profiler.

ResNet-50 at 64 px on a class-balanced subset of the shared Tiny ImageNet, as in
train_throughput.py (a): a cold decode into the cache, then epochs of the real
trainer.train_one_epoch(). The last epoch runs under torch.profiler; the trainer's named ranges
(data: copy, augment, normalise; forward; backward; optimizer; bookkeeping: the step's loss and
accuracy, progress, checkpoint hooks) are summed, and what lies outside them is the loader
(sampling, reading the batch from the memory-mapped cache). Prints the CPU kind, the precision,
seconds and the share of each part, then the ten most expensive operators.

    python benchmarks/profile_epoch.py [--images 2000] [--epochs 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import cpu_kind, tiny_subset, transferlab_loop
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm
from train_throughput import make_model

from transferlab import batching, decoding, evaluate, trainer
from transferlab.config import make_config

RANGES = ("data", "forward", "backward", "optimizer", "bookkeeping")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="training images (of 20,000)")
    p.add_argument("--epochs", type=int, default=2, help="the last one is profiled")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    split = tiny_subset("train", args.images)
    precision = evaluate.resolve_precision("auto")
    print(f"{cpu_kind()}, precision auto -> {precision}, {torch.get_num_threads()} threads")
    cfg = make_config({"batch_size": args.batch, "lr": 1e-3, "schedule": "constant"})
    model, opt = make_model(channels_last=True)
    aug = batching.Augment(crop="pad", pad=args.size // 8, flip=True)
    loop = transferlab_loop(model, opt, aug, cfg)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        images = decoding.decode(split, args.size, 3, cache=Path(cache), quiet=True)
        decode = time.perf_counter() - t0
        print(
            f"decode (cold, {decoding.cores()} threads): {decode:.2f} s, "
            f"{len(split) / decode:.0f} img/s"
        )
        for epoch in range(1, args.epochs + 1):
            batches = batching.loader(images, split.labels, args.batch, 0, epoch, shuffle=True)
            params = aug.params(len(split), args.size, 0, epoch)
            last = epoch == args.epochs
            with profile(activities=[ProfilerActivity.CPU]) if last else nullcontext() as prof:
                t0 = time.perf_counter()
                trainer.train_one_epoch(
                    loop,
                    tqdm(batches, disable=True),
                    params,
                    trainer.Progress(),
                    lambda *_, **__: None,
                )
                seconds = time.perf_counter() - t0
            print(f"epoch {epoch}: {seconds:.1f} s, {len(split) / seconds:.1f} img/s")
    events = {e.key: e for e in prof.key_averages()}
    parts = {r: events[r].cpu_time_total / 1e6 for r in RANGES if r in events}
    parts["loader (the rest)"] = seconds - sum(parts.values())
    model_s = sum(parts.get(r, 0.0) for r in ("forward", "backward", "optimizer"))
    print(f"\nprofiled epoch: {seconds:.1f} s (profiler on)")
    for name, s in parts.items():
        print(f"  {name:<20} {s:7.2f} s  {s / seconds:6.1%}")
    print(f"model (forward + backward + optimizer): {model_s / seconds:.1%} of the epoch")
    whole = seconds * args.epochs + decode  # the others ran as long as the profiled one
    print(f"with the cold decode over {args.epochs} epochs: decode {decode / whole:.1%}")
    print("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
