"""Does an ImageNet-style centre crop or a larger input size help a Lite probe on Tiny ImageNet?

Tiny ImageNet's 64-px images are resized whole to the backbone's size (`decoding`). timm's
ImageNet evaluation resizes to size / crop_pct and crops the centre (crop_pct 0.875 for the
Lites), so objects look 14% larger to the model there. Each SIZE:CROP setting below decodes the
first 50 train images of every class (fitted) and the last 20 (held out), computes the
backbone's pooled features in bf16 autocast, and fits the L2 logistic regression transferlab's
probe fits (pulled towards the ImageNet head's rows of the same WordNet ids) at four strengths.
Prints the held-out top-1 and NLL of each. Train images only: the official val images (the
test split of `tiny-imagenet:`) are not read.

    python benchmarks/tiny_crop.py ../shared/data/tiny-imagenet-200 \
        --arch tf_efficientnet_lite0 --settings 224:1,224:0.875,256:1
"""

import argparse
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from transferlab import linear, packaged, weights

N_FIT, N_HELD = 50, 20


def prep(a: np.ndarray, size: int, crop: float) -> np.ndarray:
    big = round(size / crop)
    im = Image.fromarray(a).resize((big, big), Image.BICUBIC)
    o = (big - size) // 2
    return np.asarray(im.crop((o, o, o + size, o + size)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the tiny-imagenet-200 folder")
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--settings", default="224:1,224:0.875,256:1", help="SIZE:CROP_PCT,...")
    args = ap.parse_args()
    wnids = sorted(p.name for p in (args.root / "train").iterdir())
    files, labels = [], []
    for k, w in enumerate(wnids):
        images = sorted((args.root / "train" / w / "images").glob("*.JPEG"))
        files += images[:N_FIT] + images[-N_HELD:]
        labels += [k] * (N_FIT + N_HELD)
    y = np.array(labels)
    fit = np.tile(np.r_[np.ones(N_FIT, bool), np.zeros(N_HELD, bool)], len(wnids))
    raw = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    state, _, name = packaged.load(args.arch)
    m = timm.create_model(name, pretrained=False)
    m.load_state_dict(state)
    m = m.eval().to(memory_format=torch.channels_last)
    rows = [weights.imagenet_wnids().index(w) for w in wnids]
    w0, b0 = m.classifier.weight.detach()[rows], m.classifier.bias.detach()[rows]
    for setting in args.settings.split(","):
        size, crop = int(setting.split(":")[0]), float(setting.split(":")[1])
        t0, feats = time.time(), []
        with torch.inference_mode():
            for i in range(0, len(raw), 64):
                x = np.stack([prep(a, size, crop) for a in raw[i : i + 64]])
                x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
                with torch.autocast("cpu", torch.bfloat16):
                    f = m.forward_features(x.contiguous(memory_format=torch.channels_last))
                    feats.append(m.forward_head(f, pre_logits=True).float())
        f, seconds = torch.cat(feats), time.time() - t0
        said = []
        for lam in (0.003, 0.01, 0.03, 0.1):
            _, best = linear.fit_linear(
                {"train": f[fit], "val": f[~fit]}, {"train": y[fit], "val": y[~fit]},
                w0, b0, lam, lambda *a: None, "probe",
            )  # fmt: skip
            said.append(f"l2 {lam:g} {best['val_acc']:.2%} ({best['val_loss']:.3f})")
        print(f"{args.arch} {size} px crop {crop:g}: features {seconds:.0f} s; " + "; ".join(said))


if __name__ == "__main__":
    main()
