"""What each probe of a finished `transferlab auto` study is worth per CPU-second.

For every probe the study ran: its seconds (decoding, features and the regression's 5 folds),
its out-of-fold top-1, and what it adds to the logit vote (geometric mean) of the study's other
probes: CV top-1 with it minus without, NLL without it minus with (> 0: better), per minute.
Issue 19 point 5 asks for a backbone's gain over EfficientNet-Lite2 per CPU-second on 15-Scene:
run this on a 15-Scene study. Out-of-fold over train+val only; the test split is not read.

    python benchmarks/member_gain.py runs/auto-15scene
"""

import argparse
import json
from pathlib import Path

import numpy as np

from transferlab import data, evaluate, folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="a `transferlab auto` output folder")
    args = ap.parse_args()
    study = json.loads((args.study / "auto.json").read_text())
    y = folds.pool(data.load(study["settings"]["data"]).splits).labels
    done = [c for c in study["candidates"] if c["kind"] == "probe" and c["status"] == "done"]
    logp = {c["name"]: np.load(args.study / "oof" / f"{c['name']}.npz")["logp"] for c in done}

    def score(names):
        lp = evaluate.log_softmax(sum(logp[n] for n in names) / len(names))  # geometric mean
        return (lp.argmax(1) == y).mean() * 100, -lp[np.arange(len(y)), y].mean()

    everyone = [c["name"] for c in done]
    top1, nll = score(everyone)
    print(
        f"{args.study}: logit vote of the {len(done)} probes: CV top-1 {top1:.2f}%, NLL {nll:.4f}"
    )
    print(f"{'probe':<28}{'seconds':>8}{'OOF top-1':>11}{'adds top-1':>12}{'adds NLL':>10}"
          f"{'top-1 per min':>15}")  # fmt: skip
    for c in done:
        rest = [n for n in everyone if n != c["name"]]
        base = score(rest) if rest else (0.0, float("inf"))
        gain, nll_gain = top1 - base[0], base[1] - nll
        per_min = gain / (c["seconds"] / 60)
        print(f"{c['name']:<28}{c['seconds']:>8.0f}{c['cv']['top1'] * 100:>10.2f}%"
              f"{gain:>+11.2f}p{nll_gain:>+10.4f}{per_min:>+14.3f}p")  # fmt: skip


if __name__ == "__main__":
    main()
