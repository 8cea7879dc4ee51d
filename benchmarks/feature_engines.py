"""Feature extraction on each engine here, side by side: PyTorch vs ONNX Runtime.

What probes, `transferlab auto` and ensemble evaluation spend most CPU time on: the pooled
pre-logit features of a frozen backbone over a decoded uint8 array. For each model at its own
ImageNet input size, the engines `--feature-engine` chooses from (engines.py): PyTorch eval in
fp32 and (where the CPU has native bf16) bf16 autocast, channels_last, each with and without
its BatchNorms folded into the convolutions (`models.fold_batchnorm`, what the torch engine
runs); and the same forward exported to ONNX (torch.onnx dynamo) run by ONNX Runtime's CPU
provider, normalisation included. Random weights and images (speed does not depend on them).
Prints the CPU kind, img/s per engine, the largest feature difference against unfolded PyTorch
fp32, `fastest=` per model and the folding's gain.

    python benchmarks/feature_engines.py [--images 256] [--batch 16] [--onnx-batch 32] [--models lite0 lite2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime
import torch
from common import cpu_kind, seed_all

from transferlab import engines, evaluate, models

SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}


def best_of(fn, repeats: int = 2) -> float:
    fn()  # warm-up: kernel generation, first-touch allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(short: str, args, native_bf16: bool) -> None:
    """One model: every engine timed, its features compared, the fastest printed."""
    seed_all()
    size = SIZES[short]
    model = models.create(f"tf_efficientnet_{short}", 200, 3).eval()
    model = model.to(memory_format=torch.channels_last)
    prep = models.Preprocessing.make(size, 3, [0.5] * 3, [0.5] * 3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    results, feats = {}, {}
    engines_here = {}
    for precision in ("fp32", "bf16") if native_bf16 else ("fp32",):
        for fold in (False, True):
            key = f"torch {precision}" + ("" if fold else " unfolded")
            engines_here[key] = engines.torch_engine(model, prep, precision, args.batch, fold)
    onnx = engines.onnx_engine(model, prep, None)  # exported here (not timed)
    onnx.batch = args.onnx_batch or engines.ONNX_BATCH
    engines_here["onnxruntime fp32"] = onnx
    for key, engine in engines_here.items():

        def run(engine=engine, key=key):
            feats[key] = engine.features(images, key, quiet=True)

        results[key] = best_of(run)
    for name, seconds in results.items():
        diff = np.abs(feats[name] - feats["torch fp32 unfolded"]).max()
        print(
            f"{short}-{size}  {name:<22} {args.images / seconds:7.1f} img/s  "
            f"max |diff| vs torch fp32 unfolded {diff:.2e}"
        )
    fastest, slowest = min(results, key=results.get), max(results.values())
    print(f"{short}: fastest={fastest} ({slowest / results[fastest]:.2f}x the slowest)")
    for precision in ("fp32", "bf16") if native_bf16 else ("fp32",):
        gain = results[f"torch {precision} unfolded"] / results[f"torch {precision}"]
        print(f"{short}: BatchNorm folding {precision} {gain:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="torch's batch size")
    p.add_argument("--onnx-batch", type=int, help=f"ONNX Runtime's [{engines.ONNX_BATCH}]")
    p.add_argument("--models", nargs="+", default=["lite0", "lite2"], choices=list(SIZES))
    args = p.parse_args()
    print(f"{cpu_kind()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    for short in args.models:
        measure(short, args, evaluate.bf16_supported())


if __name__ == "__main__":
    main()
