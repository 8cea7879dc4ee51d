"""Feature engines: what computes a frozen backbone's pooled features over a decoded split, the
work probes, `transferlab auto` and probe ensembles spend most CPU time on.

torch         the model itself: eval mode, channels_last, the run's precision (bf16 autocast
              where the CPU has native bf16), `evaluate.predict`
onnxruntime   the same forward (`models.Forward`, pre-logits) exported to ONNX by torch.onnx
              (dynamo) and run by ONNX Runtime's CPU provider in fp32, one intra-op thread per
              core, 32 images a batch (its best here; torch's is 8-16): the Lite backbones'
              features 2.8-3.2x faster than torch fp32 and 1.2-1.3x faster than torch bf16 at
              each engine's best batch on a 2-core EPYC with AVX512-BF16 (random images,
              benchmarks/feature_engines.py; on Tiny ImageNet's Lite2 features torch bf16 was
              timed faster), equal to torch fp32 within 2e-5
auto          torch on a GPU, in bf16 (see `choose`), where onnxruntime is not installed, or
              for fewer images than the export (~20 s) could repay; otherwise both are timed on
              the first images and the faster is taken (the choice and both speeds are printed)

The export is kept in the feature cache (`cache/engines/`), so a second probe of the same
backbone, a resumed run or another seed does not pay it again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import batching, checkpoint, decoding, evaluate, models

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_BATCH = 32  # images per ONNX Runtime call: lite2-260 57.6 img/s at 8, 76.5 at 32, 66.5 at 64
MIN_IMAGES = 1000  # fewer: torch, untimed (the export could not pay)
EXPORT_SECONDS = 25.0  # torch.onnx (dynamo) of Lite0/Lite2 here: 16-22 s, plus the timing
TIMED_IMAGES = 96  # per engine, after two warm-up batches (3 batches misjudged Lite2 by 15%)


@dataclass
class Engine:
    """A chosen engine: its name, the precision its features have, and how it runs a batch."""

    name: str
    precision: str
    run: object  # (uint8 (B, H, W, C) array) -> (B, F) float32 array
    batch: int  # images per call

    @property
    def key(self) -> str:
        """What cached features computed by this engine are filed under."""
        return self.precision if self.name == "torch" else f"{self.name}-{self.precision}"

    def features(self, images: np.ndarray, desc: str, quiet: bool, check=lambda w: None):
        """Features (N, F) of a whole split, `check(desc)` before each batch (it raises to stop)."""
        from .bars import bar

        out = []
        starts = range(0, len(images), self.batch)
        for s in bar(starts, desc=desc, disable=quiet, unit="batch"):
            check(desc)
            out.append(self.run(images[s : s + self.batch]))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def keys(setting: str, precision: str) -> list[str]:
    """The cache keys features from `setting` may be filed under (looked up before choosing)."""
    names = {"auto": ["torch", "onnxruntime"], "torch": ["torch"], "onnxruntime": ["onnxruntime"]}
    if setting == "auto" and precision != "fp32":
        names["auto"] = ["torch"]  # see `choose`
    return [precision if n == "torch" else f"{n}-fp32" for n in names[setting]]


def torch_engine(
    model: nn.Module, prep: models.Preprocessing, precision: str, batch_size: int, fold=True
) -> Engine:
    """The model's pre-logit forward in PyTorch; `fold`: on a copy with its BatchNorms folded
    into the convolutions (`models.fold_batchnorm`; the model is frozen for features)."""
    if fold:
        model = models.fold_batchnorm(model, prep.input_size, prep.channels)

    def run(x: np.ndarray) -> np.ndarray:
        return evaluate.predict(model, x, prep, precision, len(x), pre_logits=True)

    return Engine("torch", precision, run, batch_size)


def onnx_engine(model: nn.Module, prep: models.Preprocessing, cache: Path | None) -> Engine:
    """The model's pre-logit forward on ONNX Runtime (exported once, kept under `cache`)."""
    from . import export

    _, onnxruntime = export.onnx_packages()
    path = _export_path(model, prep, cache)
    if path is not None and path.is_file():
        proto = path.read_bytes()
    else:
        x = torch.zeros(2, prep.channels, prep.input_size, prep.input_size)
        forward = models.Forward(model.eval(), "fp32", pre_logits=True)
        proto = export.onnx_proto(forward, x, "features").SerializeToString()
        if path is not None:
            with checkpoint.atomic_path(path) as tmp:
                tmp.write_bytes(proto)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = decoding.cores()
    session = onnxruntime.InferenceSession(proto, options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        xb = batching.normalize(torch.from_numpy(np.array(x)), prep.mean, prep.std)
        return session.run(None, {"image": xb.contiguous().numpy()})[0]

    return Engine("onnxruntime", "fp32", run, ONNX_BATCH)


def _export_path(model: nn.Module, prep: models.Preprocessing, cache: Path | None) -> Path | None:
    if cache is None:
        return None
    from .probe import backbone_sha256

    made_of = [backbone_sha256(model), prep.to_dict(), *models.feature_layout(model)]
    key = json.dumps([*made_of, torch.__version__])
    return Path(cache) / "engines" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def seconds_per_image(engine: Engine, images: np.ndarray, warm_up: int = 2) -> float:
    """Timed on TIMED_IMAGES of `images` in the engine's batches, after `warm_up` batches."""
    b = engine.batch
    for _ in range(warm_up):
        engine.run(images[:b])
    n = min(len(images), max(TIMED_IMAGES, b))
    t0 = time.perf_counter()
    for s in range(0, n, b):
        engine.run(images[s : s + b])
    return (time.perf_counter() - t0) / n


ORT_BEST_GAIN = 3.0  # ONNX Runtime's best measured over torch fp32 (folded): 1.9-3.2x


def decide(n: int, torch_s: float, export_s: float = EXPORT_SECONDS) -> bool:
    """Whether ONNX Runtime is worth timing for `n` images that take `torch_s` s each on torch
    in fp32: only if its best measured gain could repay the export twice over."""
    return n * torch_s * (1 - 1 / ORT_BEST_GAIN) > 2 * export_s


def choose(
    setting: str,
    model: nn.Module,
    prep: models.Preprocessing,
    precision: str,
    sample: np.ndarray,
    n: int,
    batch_size: int,
    log,
    cache: Path | None = None,
) -> Engine:
    """The engine `setting` names, or for "auto" the faster here on `sample` for `n` images.

    "auto" weighs ONNX Runtime only where the run's precision is fp32, as its own: there the
    two agree within 2e-5 and evaluate, predict and serve score what the probe recorded. Where
    the run is bf16, torch is kept (folded bf16 features were also the faster on a 2-core EPYC
    with AVX512-BF16: Lite0 194 vs 164 img/s, Lite2 105 vs 81)."""
    if setting == "onnxruntime":
        engine = onnx_engine(model, prep, cache)
        log("   features: onnxruntime (fp32), as set")
        return engine
    engine = torch_engine(model, prep, precision, batch_size)
    if (
        setting == "torch"
        or precision != "fp32"
        or n < MIN_IMAGES
        or evaluate.device().type == "cuda"
        or not onnx_available()
    ):
        return engine
    torch_s = seconds_per_image(engine, sample)
    if not decide(n, torch_s):
        return engine
    ort = onnx_engine(model, prep, cache)
    ort_s = seconds_per_image(ort, sample)
    # a second round of each, the best kept: a shared 2-core machine's speed drifts by 10-20%
    # within a minute, which one round misread for Lite2 as torch 75 img/s (62 on the split)
    torch_s = min(torch_s, seconds_per_image(engine, sample, warm_up=0))
    ort_s = min(ort_s, seconds_per_image(ort, sample, warm_up=0))
    best = ort if ort_s < torch_s else engine
    log(
        f"   features: {best.name} ({best.precision}), the faster here: torch {precision} "
        f"{1 / torch_s:.0f} img/s, onnxruntime fp32 {1 / ort_s:.0f} img/s "
        "(--feature-engine to choose)"
    )
    return best
