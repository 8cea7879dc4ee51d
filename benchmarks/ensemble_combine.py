"""Seconds to fit (on val) and apply (on test) every ensemble combiner on cached logits.

Synthetic member log-probs: 10 members, 10,000 test images, a 2,000-image validation split,
100 classes; each member is right on a random ~60% of images. Fusion is not here: it trains a
head on features, not on logits. The target (issue 6): every combiner < 1 s for 10 x 10,000.
Combining (apply) is what runs at every prediction; fitting runs once, on val. Last lines:
`max_apply_seconds=` and `max_fit_seconds=` (the slowest of each).

    python benchmarks/ensemble_combine.py [--members 10] [--images 10000] [--classes 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from transferlab import combiners, evaluate


def members(rng, m: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    targets = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (m, n, k))
    right = rng.random((m, n)) < 0.6
    logits[:, np.arange(n), targets] += 3.0 * right
    return np.stack([evaluate.log_softmax(lg) for lg in logits]), targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--val", type=int, default=2_000)
    ap.add_argument("--classes", type=int, default=100)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    val, val_y = members(rng, args.members, args.val, args.classes)
    test, test_y = members(rng, args.members, args.images, args.classes)
    print(f"{args.members} members, val {args.val}, test {args.images}, {args.classes} classes")
    print(f"{'method':<10} {'fit s':>7} {'apply s':>8} {'test top-1':>10}")
    worst_apply = worst_fit = 0.0
    for method in (m for m in combiners.COMBINERS if m != "fusion"):
        t0 = time.perf_counter()
        params = combiners.fit(method, val, val_y, "val")
        t1 = time.perf_counter()
        combined = combiners.combine(method, test, params)
        t2 = time.perf_counter()
        top1 = evaluate.metrics(combined, test_y)["top1"]
        print(f"{method:<10} {t1 - t0:>7.3f} {t2 - t1:>8.3f} {top1:>10.2%}")
        worst_apply, worst_fit = max(worst_apply, t2 - t1), max(worst_fit, t1 - t0)
    print(f"max_apply_seconds={worst_apply:.3f}")
    print(f"max_fit_seconds={worst_fit:.3f}")


if __name__ == "__main__":
    main()
