"""Cost grows linearly: one training epoch at 5k, 10k and 20k Tiny ImageNet images.

Each size runs in its own process (so its peak RSS is its own): decode into a fresh cache
(timed apart), then one epoch of transferlab's training path (ResNet-18, 64 px, batch 64).
Prints a Markdown table with seconds per image relative to the smallest size.

    python benchmarks/scaling.py [--sizes 5000 10000 20000] [--model resnet18]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
import torch
from common import seed_all, timed, tiny_subset, transferlab_loop
from tqdm import tqdm

from transferlab import batching, decoding, strategies, trainer
from transferlab.config import make_config


def one(n: int, model_name: str) -> dict:
    split = tiny_subset("train", n)
    with tempfile.TemporaryDirectory() as cache:
        t_decode, images = timed(
            lambda: decoding.decode(split, 64, 3, cache=Path(cache), quiet=True)
        )
        seed_all()
        model = timm.create_model(model_name, num_classes=200).to(memory_format=torch.channels_last)
        cfg = make_config({"batch_size": 64, "schedule": "constant"})
        opt = strategies.make_optimizer(cfg, list(model.parameters()), cfg.lr)
        aug = batching.Augment(crop="pad", pad=8, flip=True)

        loop = transferlab_loop(model, opt, aug, cfg)

        def epoch():
            batches = tqdm(
                batching.loader(images, split.labels, 64, 0, 1, shuffle=True), disable=True
            )
            trainer.train_one_epoch(
                loop,
                batches,
                aug.params(len(split), 64, 0, 1),
                trainer.Progress(),
                lambda *_, **__: None,
            )

        t_epoch, _ = timed(epoch)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": len(split), "decode_s": t_decode, "epoch_s": t_epoch, "rss_mb": rss_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--model", args.model],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['n']} images: epoch {r['epoch_s']:.1f} s, decode {r['decode_s']:.1f} s, "
            f"peak RSS {r['rss_mb']:.0f} MB",
            flush=True,
        )
    base = rows[0]["epoch_s"] / rows[0]["n"]
    print(
        f"\n| images | epoch (s) | ms/image | vs {rows[0]['n']} | decode once (s) | "
        "peak RSS (MB) |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        per = r["epoch_s"] / r["n"]
        print(
            f"| {r['n']} | {r['epoch_s']:.1f} | {1000 * per:.2f} | {per / base:.2f} | "
            f"{r['decode_s']:.1f} | {r['rss_mb']:.0f} |"
        )
    spread = max(r["epoch_s"] / r["n"] for r in rows) / min(r["epoch_s"] / r["n"] for r in rows)
    print(f"max/min time per image={spread:.2f}")


if __name__ == "__main__":
    main()
