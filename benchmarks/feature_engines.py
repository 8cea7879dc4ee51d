"""Feature extraction on each engine here, side by side: PyTorch vs ONNX Runtime.

What probes, `transferlab auto` and ensemble evaluation spend most CPU time on: the pooled
pre-logit features of a frozen backbone over a decoded uint8 array. For each model at its own
ImageNet input size: PyTorch eval in fp32 and (where the CPU has native bf16) bf16 autocast,
both channels_last, through transferlab's `evaluate.predict`; and the same module exported to
ONNX (torch.onnx dynamo) run by ONNX Runtime's CPU provider, normalisation included in both.
Random weights and images (speed does not depend on them). Prints the CPU kind, img/s per
engine, the largest feature difference against PyTorch fp32, and `fastest=` per model.

    python benchmarks/feature_engines.py [--images 256] [--batch 16] [--models lite0 lite2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import cpu_kind, seed_all

from transferlab import batching, decoding, evaluate, export, models

SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}


class Features(torch.nn.Module):
    """Normalised NCHW float images -> pooled pre-logit features (what a probe fits on)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return models.logits(self.model, x, "fp32", pre_logits=True)


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
    for precision in ["fp32"] + (["bf16"] if native_bf16 else []):

        def run(precision=precision):
            feats[precision] = evaluate.predict(
                model, images, prep, precision, args.batch, pre_logits=True
            )

        results[f"torch {precision}"] = best_of(run)
    with tempfile.TemporaryDirectory() as tmp:
        x = batching.normalize(torch.from_numpy(images[: args.batch]), prep.mean, prep.std)
        path = Path(tmp) / "features.onnx"
        export.onnx_file(Features(model), x.contiguous(), path, "{}", "features")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = decoding.cores()
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

        def run_ort():
            out = []
            for i in range(0, len(images), args.batch):
                xb = torch.from_numpy(images[i : i + args.batch])
                xb = batching.normalize(xb, prep.mean, prep.std).contiguous().numpy()
                out.append(session.run(None, {"image": xb})[0])
            feats["ort"] = np.concatenate(out)

        results["onnxruntime fp32"] = best_of(run_ort)
    for name, seconds in results.items():
        key = name.split()[-1] if name.startswith("torch") else "ort"
        diff = np.abs(feats[key] - feats["fp32"]).max()
        print(
            f"{short}-{size}  {name:<18} {args.images / seconds:7.1f} img/s  "
            f"max |diff| vs torch fp32 {diff:.2e}"
        )
    fastest, slowest = min(results, key=results.get), max(results.values())
    print(f"{short}: fastest={fastest} ({slowest / results[fastest]:.2f}x the slowest)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--models", nargs="+", default=["lite0", "lite2"], choices=list(SIZES))
    args = p.parse_args()
    print(f"{cpu_kind()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    for short in args.models:
        measure(short, args, evaluate.bf16_supported())


if __name__ == "__main__":
    main()
