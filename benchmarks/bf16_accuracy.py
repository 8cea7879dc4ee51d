"""Does bf16 autocast cost accuracy? The demo's models on digits, trained in fp32 and in bf16.

Uses the steps of recipes/seed-demo.yaml (same settings) and prints each model's test top-1 in
both precisions, per seed, and the mean difference over the seeds. Where the CPU has no native bf16 (AVX512-BF16 or
AMX), bf16 is emulated and slow: pick the cheap steps there (`--steps dcnn`).

    python benchmarks/bf16_accuracy.py [--steps dcnn resnet50 lite0] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml

from transferlab import data, evaluate, trainer
from transferlab.checkpoint import read_meta
from transferlab.config import make_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "seed-demo.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", nargs="+", default=["dcnn"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = p.parse_args()
    recipe = yaml.safe_load(RECIPE.read_text())
    steps = {s["train"]: s for s in recipe["steps"] if "train" in s}
    print(
        f"native bf16: {evaluate.bf16_supported()}; digits, seeds {args.seeds}, "
        f"settings of {RECIPE.name}"
    )
    worst = 0.0
    ds = data.load(recipe["data"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.steps:
            keys = {k: v for k, v in steps[name].items() if k != "train"}
            diffs = []
            for seed in args.seeds:
                top1, runs = {}, {}
                for precision in ("fp32", "bf16"):
                    cfg = make_config(
                        {"data": recipe["data"], **recipe["defaults"], **keys}
                        | {"precision": precision, "seed": seed}
                    )
                    runs[precision] = Path(tmp) / f"{name}-{precision}-{seed}"
                    meta = trainer.fit(cfg, runs[precision], quiet=True)
                    top1[precision] = meta["metrics"]["test"]["top1"]
                # the fp32-trained model, evaluated under bf16 autocast: inference's share
                meta = read_meta(runs["fp32"])
                model = evaluate.load_run_model(runs["fp32"], meta)
                logits = evaluate.predict_split(
                    model, meta | {"precision": "bf16"}, ds, "test", name
                )
                top1["bf16 inference"] = evaluate.metrics(logits, ds.splits["test"].labels)["top1"]
                diffs.append(100 * (top1["bf16"] - top1["fp32"]))
                print(
                    f"{name:<10} seed {seed}  fp32 {top1['fp32']:.2%}  bf16 {top1['bf16']:.2%}  "
                    f"difference {diffs[-1]:+.2f} points  (fp32 weights, bf16 inference: "
                    f"{top1['bf16 inference']:.2%})",
                    flush=True,
                )
            mean = statistics.mean(diffs)
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            print(f"{name:<10} mean difference {mean:+.2f} ± {spread:.2f} points", flush=True)
            worst = max(worst, abs(mean))
    print(f"max_abs_mean_difference_points={worst:.2f}")


if __name__ == "__main__":
    main()
