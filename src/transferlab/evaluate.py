"""Predict, then score: predict() returns logits; metrics are pure functions of saved logits."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import batching, checkpoint, data, decoding, leaks, models
from .bars import bar
from .config import UnreadableImages, UserError, few
from .folds import load_as_run


def bf16_supported() -> bool:
    """bf16 autocast pays off only with native bf16 matmuls (AVX512-BF16/AMX, or CUDA)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return native_bf16(_cpuinfo(), platform.machine(), bool(onednn))


def native_bf16(cpuinfo: str, machine: str, onednn: bool) -> bool:
    """Whether the CPU computes bf16 itself: oneDNN says yes on any AVX-512 x86 CPU, where it
    emulates bf16 without avx512_bf16 or amx_bf16 (an Ice Lake Xeon: bf16 0.92x fp32, which
    --precision auto picked); other CPUs as oneDNN says."""
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686") or not cpuinfo:
        return onednn
    return onednn and re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@functools.cache
def _cpuinfo() -> str:
    try:
        return open("/proc/cpuinfo").read()
    except OSError:  # (not Linux: oneDNN's word)
        return ""


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


def inference_precision(trained: str) -> str:
    """A run's precision for predicting here: fp32 where this machine lacks fast bf16/fp16
    (a run trained with bf16 on a GPU, evaluated on a CPU without native bf16)."""
    if (trained == "bf16" and not bf16_supported()) or (
        trained == "fp16" and device().type != "cuda"
    ):
        return "fp32"
    return trained


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device().type, dtype=dtype) if dtype else contextlib.nullcontext()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray,
    prep: models.Preprocessing,
    precision: str = "fp32",
    batch_size: int = 256,
    desc: str = "predict",
    quiet: bool = True,
    pre_logits: bool = False,
    tta: str = "none",
) -> np.ndarray:
    """Logits (N, K) float32 for a decoded uint8 array (N, H, W, C), in eval mode.

    `pre_logits`: the pooled features the head sees instead (N, F). `tta`: average over views
    (see `views`).
    """
    model.eval()
    dev = device()
    out = []
    starts = range(0, len(images), batch_size)
    for start in bar(starts, desc=desc, disable=quiet, unit="batch"):
        x = torch.from_numpy(np.array(images[start : start + batch_size]))  # (B, H, W, C) uint8
        x = batching.normalize(x.to(dev, non_blocking=True), prep.mean, prep.std)
        y = sum(models.logits(model, v, precision, pre_logits) for v in views(x, tta))
        out.append(y.cpu() / len(TTA_VIEWS[tta]))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


# Test-time augmentation: (crop box as (top, left, side) fractions of the image, mirrored?).
_CORNERS = [(0.0, 0.0), (0.0, 0.125), (0.125, 0.0), (0.125, 0.125), (0.0625, 0.0625)]
TTA_VIEWS = {
    "none": [((0.0, 0.0, 1.0), False)],
    "flip": [((0.0, 0.0, 1.0), False), ((0.0, 0.0, 1.0), True)],
    # ten-crop: four corners and the centre at 87.5% of the side, each mirrored, resized back
    "crops": [((t, left, 0.875), m) for t, left in _CORNERS for m in (False, True)],
}
TTA_MIN_SIZE = 96  # crops of smaller inputs lose too much


def check_tta(tta: str, input_size: int | None = None, who: str = "") -> None:
    """A known TTA name; crops only for inputs of at least TTA_MIN_SIZE (when a size is given)."""
    if tta not in TTA_VIEWS:
        raise UserError(f"unknown --tta '{tta}' (known: {', '.join(TTA_VIEWS)})")
    if tta == "crops" and input_size is not None and input_size < TTA_MIN_SIZE:
        raise UserError(
            f"--tta crops needs inputs of at least {TTA_MIN_SIZE} px; {who} sees {input_size} px "
            "(use --tta flip)"
        )


def mirror_notes(tta: str, runs: list, metas: list[dict]) -> list[str]:
    """What --tta flip or crops (their views mirrored) does to a run trained with --no-flip:
    it never saw a mirror, which it may read as another class (digits, text)."""
    unflipped = [os.path.normpath(r) for r, m in zip(runs, metas, strict=True) if (m.get("config") or {}).get("flip") is False]  # fmt: skip
    if tta == "none" or not unflipped:
        return []
    one = len(unflipped) == 1
    return [f"--tta {tta} averages each image with its mirror{'s' if tta == 'crops' else ''}, and {', '.join(unflipped)} {'was' if one else 'were'} trained with --no-flip: a mirrored digit or letter may read as another class to {'it' if one else 'them'} (leave out --tta)"]  # fmt: skip


def views(x: torch.Tensor, tta: str):
    """The views of a normalised batch (B, C, H, W) that TTA averages over."""
    size = x.shape[-1]
    for (top, left, side), mirror in TTA_VIEWS[tta]:
        v = x
        if side < 1.0:
            y0, x0, s = round(top * size), round(left * size), round(side * size)
            v = F.interpolate(
                x[..., y0 : y0 + s, x0 : x0 + s], size=x.shape[-2:], mode="bilinear", antialias=True
            )
        yield v.flip(-1) if mirror else v


@torch.no_grad()
def head_logits(model: nn.Module, feats: np.ndarray) -> np.ndarray:
    """Logits from pooled pre-logit features: the classifier alone (eval mode, fp32)."""
    head = model.get_classifier().float()
    return head(torch.from_numpy(feats).to(device())).cpu().numpy()


def load_run_model(run, meta: dict, scoring: bool = False) -> nn.Module:
    """The trained model of a run folder (weights from safetensors, checked against meta.json);
    `scoring`: as every score is computed (`frozen`), not as it trains or exports."""
    model = models.for_run(meta)
    model.load_state_dict(checkpoint.load_run_weights(run, meta))
    model = model.to(device()).to(memory_format=torch.channels_last)
    if scoring:
        return frozen(model, models.Preprocessing.from_dict(meta["preprocessing"]))
    return model


def frozen(model: nn.Module, prep: models.Preprocessing) -> nn.Module:
    """The model as every score is computed: eval mode, BatchNorms folded into their
    convolutions (`models.fold_batchnorm`). Training's recorded scores, probe features,
    evaluate, predict, ensembles and serve all run this one forward, so they agree at any
    precision: bf16 rounds a folded and an unfolded network differently (a Lite0 probe at 64 px
    on digits scored 78.89% on folded bf16 features and 78.06% unfolded; fp32 79.44%)."""
    return models.fold_batchnorm(model.eval(), prep.input_size, prep.channels)


def predict_split(
    model: nn.Module,
    meta: dict,
    ds: data.Dataset,
    split: str,
    who: str,
    quiet: bool = True,
    tta: str = "none",
    pre_logits: bool = False,
) -> np.ndarray:
    """A run's logits on a split of `ds`, through the run's own preprocessing and precision.

    Columns follow the dataset's classes (matched by id or name; an unknown class is refused).
    The split is decoded once per input size through the decode cache, so members that share a
    size share the decoded images. `pre_logits`: the pooled features instead (N, F).
    """
    cols = class_map(meta["classes"], meta["class_names"], ds.classes, ds.names, who)
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
    check_tta(tta, prep.input_size, who)
    skip = bool(meta.get("config", {}).get("skip_bad_images"))  # as the run scored itself
    try:
        images, kept, bad = decoding.decode_checked(
            ds.splits[split],
            prep.input_size,
            prep.channels,
            prep.interpolation,
            skip,
            f"decode {split}",
            quiet,
            cache=decoding.resolve_cache(None),
            lazy=True,  # WebDataset shards: decoded batch by batch
        )
    except UnreadableImages as err:  # its hint, --skip-bad-images, is train's alone
        more = carved_with(ds, split, quiet)
        rest = f", and {len(more)} in the splits it is carved with (removing files carves them anew)"  # fmt: skip
        raise UnreadableImages(
            f"{len(err.bad)} unreadable image(s) in the {split} split {who} is scored on"
            f"{rest * bool(more)}: {err.fix} (a score counts every image of its split): "
            + UnreadableImages.some(err.bad + more),
            err.bad + more,
            err.fix,
        ) from None
    if bad:  # every later member and the targets see the split without them too
        ds.splits[split] = kept
        ds.notes = (
            *ds.notes,
            f"left out {len(bad)} unreadable {split} image(s), as {who} did when it was trained "
            "(--skip-bad-images): " + "; ".join(bad),
        )
    logits = predict(
        model,
        images,
        prep,
        inference_precision(meta.get("precision", "fp32")),
        meta.get("eval_batch_size", 256),
        desc=f"predict {split}",
        quiet=quiet,
        pre_logits=pre_logits,
        tta=tta,
    )
    return logits if pre_logits else logits[:, cols]


def carved_with(ds: data.Dataset, split: str, quiet: bool) -> list[str]:
    """The unreadable images of the splits `split` was carved with (test held out of train, val
    carved from it), said with its own: once the named ones were removed, the splits were carved
    anew and others came in, a round each (pass 62; train names every split's at once)."""
    said = next((n for n in ds.notes if n.startswith("splits: ")), "")
    carved = [s for s in ds.splits if re.search(rf"\b{s} \d+ \(\d", said)]
    if split not in carved and not (split == "train" and carved):  # (train: what is left of
        return []  # them, pass 66)
    bad = []
    for other in ("train", *carved):
        try:
            if other != split and ds.splits[other].paths is not None:  # (read, not kept)
                decoding.decode(ds.splits[other], 8, 1, desc=f"check {other}", quiet=quiet, cache=None)  # fmt: skip
        except UnreadableImages as err:
            bad += err.bad
    return bad


def score_run(path, data_spec: str | None, split: str, quiet: bool = True, tta: str | None = None):
    """A run's log-probs on a split of its data (or `data_spec`), with what the user should
    know when that is not the data it was trained on.

    Returns (log-probs (N, K), targets, class names, canonical spec, notes).
    """
    meta = checkpoint.read_meta(path)
    spec = data.canonical(data_spec or meta["data"])
    ds = load_as_run(meta, spec, scored=True)
    model = load_run_model(path, meta, scoring=True)
    loaded = len(ds.notes)
    logits = predict_split(model, meta, ds, split, f"run {path}", quiet, tta or "none")
    notes = leaks.data_notes(meta, ds, split) + list(ds.notes[loaded:])  # images left out, as it did  # fmt: skip
    notes += mirror_notes(tta or "none", [path], [meta])
    return log_softmax(logits), ds.splits[split].labels, ds.names, spec, notes


def improves(val: dict, best: dict) -> bool:
    """Higher val top-1, or equal top-1 and lower loss. A NaN metric is never an improvement."""
    if not (math.isfinite(val["top1"]) and math.isfinite(val["loss"])):
        return False
    return val["top1"] > best["val_acc"] or (
        val["top1"] == best["val_acc"] and val["loss"] < best["val_loss"]
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: in float32, two logits a bf16 run left 1e-8 apart became one log-prob, and
    the tie went to the first class (a run's recorded 80% was scored 60%)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def points(share: float) -> str:
    """A difference of shares as signed points: +1.25; +0.00 for none (it was -0.00)."""
    return f"{round(100 * share, 2) + 0.0:+.2f}"


def top5_text(m: dict, template: str = "top-5 {:.2%}") -> str:
    """`template` filled with the top-5 score, or "" where it has none (5 classes or fewer:
    every answer is among the top 5, a 100% that says nothing)."""
    return "" if m.get("top5") is None else template.format(m["top5"])


def metrics(logits: np.ndarray, targets: np.ndarray) -> dict:
    """top1, top5 (None with 5 classes or fewer: always 1), mean NLL loss, ECE, macro-F1,
    balanced accuracy and n, from logits or log-probabilities."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    n = len(targets)
    if n == 0:
        nan = float("nan")
        return {"top1": nan, "top5": nan, "loss": nan, "ece": nan, "macro_f1": nan,
                "balanced_accuracy": nan, "n": 0}  # fmt: skip
    logp = log_softmax(logits)
    k = min(5, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    with warnings.catch_warnings():  # a class predicted but absent from targets: expected
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(targets, topk[:, 0])
    return {
        "top1": float((topk[:, 0] == targets).mean()),
        "top5": float((topk == targets[:, None]).any(axis=1).mean())
        if logits.shape[1] > 5
        else None,
        "loss": float(-logp[np.arange(n), targets].mean()),
        "ece": ece(np.exp(logp.max(axis=1)), topk[:, 0] == targets),
        "macro_f1": float(f1_score(targets, topk[:, 0], average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced),
        "n": int(n),
    }


def per_class(logits: np.ndarray, targets: np.ndarray, names: list[str], pairs: int = 5) -> dict:
    """Per class: precision, recall, F1 and support (scikit-learn's definitions, 0 where a class
    is never predicted); and the `pairs` most-confused (true, predicted) pairs by count."""
    from sklearn.metrics import precision_recall_fscore_support

    pred = logits.argmax(1)
    k = len(names)
    p, r, f, support = precision_recall_fscore_support(
        targets, pred, labels=np.arange(k), zero_division=0
    )
    matrix = confusion(pred, targets, k)
    off = matrix * (1 - np.eye(k, dtype=matrix.dtype))
    order = np.argsort(-off, axis=None, kind="stable")[:pairs]
    confused = [
        {
            "true": names[t],
            "predicted": names[q],
            "count": int(off[t, q]),
            "share_of_true": float(off[t, q] / max(matrix[t].sum(), 1)),
        }  # fmt: skip
        for t, q in zip(*np.unravel_index(order, off.shape), strict=True)
        if off[t, q] > 0
    ]
    classes = [
        {
            "name": names[i],
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(support[i]),
        }  # fmt: skip
        for i in range(k)
    ]
    return {"classes": classes, "most_confused": confused}


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over equal-width bins."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / len(confidence))


def confusion(pred: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(targets, pred, labels=np.arange(num_classes))


def class_map(
    model_classes: list[str],
    model_names: list[str],
    data_classes: list[str],
    data_names: list[str],
    who: str,
) -> np.ndarray:
    """For each dataset class, the model's output index: matched by id, then by name.

    A dataset class the model does not know is refused, naming it.
    """
    by_id = {c: i for i, c in enumerate(model_classes)}
    by_name = {n.lower(): i for i, n in enumerate(model_names)}
    out, unknown = [], []
    for cid, name in zip(data_classes, data_names, strict=True):
        idx = by_id.get(cid, by_name.get(str(name).lower()))
        if idx is None:
            unknown.append(cid if cid == name else f"{cid} ({name})")
        out.append(idx)
    if unknown:
        raise UserError(f"{who} does not know class(es) {few(unknown)} of this dataset")
    return np.array(out, dtype=np.int64)


__all__ = ["predict", "metrics", "confusion", "class_map", "resolve_precision", "autocast"]
