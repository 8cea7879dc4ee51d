"""A cheaper trained member for `transferlab auto`, measured: is it worth its CPU-seconds?

EfficientNet-Lite0 at 320 px with its stem and first CUT stages frozen and run once per image
and its mirror (the activations kept in memory, bf16), then the later stages, conv_head and a
new classifier trained on them for EPOCHS epochs (AdamW, one-cycle LR, label smoothing 0.1;
augmentation: the mirror and a random 90% window of the cached maps); predictions average the
image and its mirror. Scored 5-fold out of fold on the train+val of the study's data with the
study's folds, alone and in the logit vote (sum of log-probs) with the study's members: the
question is whether it can replace the study's fine-tune (which trains every epoch through the
whole network) or add to the probes. The test split is not read.

    python benchmarks/tail_member.py /work/studies/auto-15scene45c [--cut 5 --epochs 8]
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from transferlab import batching, data, decoding, evaluate, folds, weights
from transferlab.config import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="a finished `transferlab auto` output folder")
    ap.add_argument("--cut", type=int, default=5, help="stages frozen (cached) after the stem")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="the trained stages' (head: 10x)")
    args = ap.parse_args()
    torch.manual_seed(0)
    study = json.loads((args.study / "auto.json").read_text())
    ds = data.load(study["settings"]["data"])
    y = folds.pool(ds.splits).labels
    held = folds.cv_folds(y, 5)
    cfg = TrainConfig(model="tf_efficientnet_lite0", weights="imagenet", input_size=320)
    built = weights.build(cfg, ds.classes, ds.native_size, ds.native_channels, ds.names)
    model, prep = built.model.eval(), built.prep

    t0 = time.time()
    acts = cached_activations(model, ds, prep, args.cut)
    print(f"frozen part: {tuple(acts.shape)} in {time.time() - t0:.0f} s", flush=True)
    oof = np.zeros((len(y), len(ds.classes)), np.float32)
    for k, h in enumerate(held):
        t1 = time.time()
        net = train_tail(model, acts, y, np.setdiff1d(np.arange(len(y)), h), args, seed=k)
        with torch.inference_mode():
            x = torch.as_tensor(h)
            oof[h] = ((forward(net, acts[x, 0]) + forward(net, acts[x, 1])) / 2).numpy()
        top1 = (oof[h].argmax(1) == y[h]).mean()
        print(f"fold {k}: {top1:.2%} in {time.time() - t1:.0f} s", flush=True)
    m = evaluate.metrics(oof, y)
    print(
        f"tail (cut {args.cut}, {args.epochs} epochs): OOF top-1 {m['top1']:.2%}, NLL {m['loss']:.4f}"
    )

    done = [c["name"] for c in study["candidates"] if c["status"] == "done"]
    logp = {n: np.load(args.study / "oof" / f"{n}.npz")["logp"] for n in done}
    tail = evaluate.log_softmax(oof)
    probes = [n for n in done if n.endswith("-probe")]

    def vote(names, extra=None):
        lp = sum(logp[n] for n in names) + (0 if extra is None else extra)
        return f"{(lp.argmax(1) == y).mean():.2%}"

    print(f"logit vote, CV top-1: the study's {len(done)} members {vote(done)}; with the tail "
          f"{vote(done, tail)}; its {len(probes)} probes {vote(probes)}; probes + tail "
          f"{vote(probes, tail)}")  # fmt: skip


def cached_activations(model, ds, prep, cut: int) -> torch.Tensor:
    """(N, 2, C, H, W) bf16: the frozen part's output for each train+val image and its mirror."""
    trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:cut]).eval()
    splits = ("train", "val")
    arrays = [decoding.decode(ds.splits[s], 320, 3, prep.interpolation, quiet=True) for s in splits]
    out = []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        for arr in arrays:
            for i in range(0, len(arr), 32):
                x = torch.from_numpy(np.array(arr[i : i + 32]))
                x = batching.normalize(x, prep.mean, prep.std)
                x = x.contiguous(memory_format=torch.channels_last)
                out.append(torch.stack([trunk(x), trunk(x.flip(3))], 1).to(torch.bfloat16))
    return torch.cat(out)


def train_tail(model, acts, y, fit, args, seed: int) -> nn.Module:
    """The later stages + conv_head (BatchNorms frozen) and a zero-initialised classifier."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = int(y.max()) + 1
    later = [*model.blocks[args.cut :], model.conv_head, model.bn2]
    head = nn.Linear(model.num_features, classes)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    net = nn.Sequential(*copy.deepcopy(later), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    net.train()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    body = [p for m in net[:-1] for p in m.parameters()]
    groups = [{"params": head.parameters(), "lr": args.lr * 10}, {"params": body, "lr": args.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(fit) / 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, [args.lr * 10, args.lr], total_steps=steps, pct_start=0.15
    )
    labels, size = torch.as_tensor(y), acts.shape[-1]
    window = size - size // 10
    for _ in range(args.epochs):
        perm = rng.permutation(fit)
        for i in range(0, len(perm), 32):
            idx = torch.as_tensor(perm[i : i + 32])
            x = acts[idx, torch.as_tensor(rng.integers(0, 2, len(idx)))]
            top, left = rng.integers(0, size - window + 1, 2)
            x = x[:, :, top : top + window, left : left + window]
            loss = F.cross_entropy(forward(net, x), labels[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16):
        return net(x.float()).float()


if __name__ == "__main__":
    main()
