"""Does bf16 autocast cost accuracy? The demo's models on digits, trained in fp32 and in bf16.

Uses the steps of recipes/seed-demo.yaml (same settings, seed 0) and prints each model's test
top-1 in both precisions and the difference. Where the CPU has no native bf16 (AVX512-BF16 or
AMX), bf16 is emulated and slow: pick the cheap steps there (`--steps dcnn`).

    python benchmarks/bf16_accuracy.py [--steps dcnn resnet50 lite0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml

from transferlab import train
from transferlab.config import make_config
from transferlab.evaluate import bf16_supported

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "seed-demo.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", nargs="+", default=["dcnn"])
    args = p.parse_args()
    recipe = yaml.safe_load(RECIPE.read_text())
    steps = {s["train"]: s for s in recipe["steps"] if "train" in s}
    print(f"native bf16: {bf16_supported()}; digits, seed 0, settings of {RECIPE.name}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.steps:
            keys = {k: v for k, v in steps[name].items() if k != "train"}
            top1 = {}
            for precision in ("fp32", "bf16"):
                cfg = make_config(
                    {"data": recipe["data"], **recipe["defaults"], **keys, "precision": precision}
                )
                meta = train.fit(cfg, Path(tmp) / f"{name}-{precision}", quiet=True)
                top1[precision] = meta["metrics"]["test"]["top1"]
            diff = 100 * (top1["bf16"] - top1["fp32"])
            worst = max(worst, abs(diff))
            print(
                f"{name:<10} fp32 {top1['fp32']:.2%}  bf16 {top1['bf16']:.2%}  "
                f"difference {diff:+.2f} points",
                flush=True,
            )
    print(f"max_abs_difference_points={worst:.2f}")


if __name__ == "__main__":
    main()
