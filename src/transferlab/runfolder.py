"""Writing a finished run folder: its predictions and scores on val and test, weights, logits,
cached features, history, curves, and meta.json last (it marks the run complete).

    model.safetensors   weights (arch and class names in its metadata)
    meta.json           arch, classes, preprocessing, weights source (lineage), data spec and
                        fingerprint, resolved config, metrics, versions, weights sha256
    history.csv         one row per epoch
    curves.png          loss and accuracy curves
    logits/<split>.npz  val and test predictions, for ensembles and reports
    features/<split>-none.npz  a linear probe's features, for fusion
"""

from __future__ import annotations

import csv
import io
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import timm
import torch

from . import __version__, checkpoint, evaluate, models, outputs, plots
from .config import to_dict

if TYPE_CHECKING:
    from .resume import Progress
    from .trainer import Loop


def predict_all(loop: Loop, images: np.ndarray) -> np.ndarray:
    """Logits for every image; under DDP each rank predicts a padded shard, then all gather."""
    d, n = loop.dist, len(images)
    mine = d.shard(n) if d.world > 1 else slice(None)
    model = evaluate.frozen(loop.model, loop.prep)  # as evaluate, predict and serve score it
    precision = evaluate.inference_precision(loop.precision)  # (bf16 where it is emulated: fp32)
    part = evaluate.predict(model, images[mine], loop.prep, precision, loop.cfg.eval_batch_size)
    return d.gather(part, n)


def write(
    out: Path,
    loop: Loop,
    progress: Progress,
    seconds: float,
    epoch: int | None = None,
    snapshot: dict | None = None,
    features: dict | None = None,
) -> dict:
    """Write weights, logits, history, curves and meta.json (last: it marks the run complete).

    The model as it is now, scored as progress.best's epoch (or `epoch`, for a snapshot).
    Every rank takes part in the predictions; only rank 0 writes. A linear probe's `features`
    (per split) go to the run's features/ cache, where ensembles (fusion) find them.
    """
    ds, labels, arch = loop.ds, loop.labels, loop.arch.name
    kept = {} if snapshot else {"val": progress.val_logits, "test": progress.test_logits}
    logits = {
        split: kept[split].numpy()
        if kept.get(split) is not None
        else predict_all(loop, loop.images[split])
        for split in ("val", "test")
    }
    meta = record(loop, progress, logits, seconds, epoch, snapshot)
    if not loop.dist.main:
        return meta
    cfg = loop.cfg
    key = checkpoint.features_key(ds.spec, cfg.val_fraction, cfg.limit, "none", cfg.fold)
    for split, f in (features or {}).items():
        if len(f) == len(ds.splits[split]):  # no image was skipped
            checkpoint.save_features(out, f"{split}-none", key, f)
    outputs.mark(out, "run")  # snapshots are runs of their own
    checkpoint.save_weights(out, loop.model, arch, ds.classes)
    meta["weights_sha256"] = checkpoint.sha256(checkpoint.weights_path(out))
    for split, values in logits.items():
        checkpoint.save_logits(out, split, values, labels[split])
    write_history(out / "history.csv", progress.history)
    plots.curves(progress.history, out / "curves.png", f"{out.name}: {arch} on {ds.spec}")
    checkpoint.write_json(out / checkpoint.META, meta)
    return meta


def record(loop: Loop, progress: Progress, logits: dict, seconds: float, epoch, snapshot) -> dict:
    """meta.json: what the run is (architecture, preprocessing, lineage, data, config) and how
    it scored (val and test from `logits`; train as seen during training, augmented)."""
    cfg, ds, labels, history = loop.cfg, loop.ds, loop.labels, progress.history
    best_epoch = epoch or progress.best["epoch"]
    results = {split: evaluate.metrics(logits[split], labels[split]) for split in logits}
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    results["train"] = {
        "top1": best_row["train_acc"],
        "loss": best_row["train_loss"],
        "n": len(labels["train"]),
        "note": "augmented, during training",
    }
    return {
        "format": 1,
        "arch": loop.arch.name,
        "num_classes": len(ds.classes),
        "classes": ds.classes,
        "class_names": ds.names,
        "architecture": loop.arch.to_dict(),
        "preprocessing": loop.prep.to_dict(),
        "source": loop.source,
        "data": ds.spec,
        "data_fingerprint": ds.fingerprint,
        "val_fraction": cfg.val_fraction,
        "limit": cfg.limit,
        "config": to_dict(cfg),
        "seed": cfg.seed,
        "precision": loop.precision,
        "eval_batch_size": cfg.eval_batch_size,
        "processes": loop.dist.world,
        "strategy": cfg.strategy,
        "probe": None if snapshot else progress.probe,
        "params": models.count_params(loop.model),
        "trainable_params": models.count_params(loop.model, trainable=True),
        "epochs_run": 0
        if cfg.strategy == "linear-probe"
        else sum(r["epoch"] > 0 for r in history),  # fmt: skip
        # (a probe's history rows are its L2 strengths; lp-ft's probe is epoch 0)
        "best_epoch": best_epoch,
        "seconds": round(seconds, 1),
        "metrics": results,
        "notes": loop.notes,  # what a reader of its test score must know (a leak)
        "versions": versions(),
        **({"snapshot": snapshot} if snapshot else {}),
    }


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    checkpoint.write_text(path, buf.getvalue())


def versions() -> dict:
    return {
        "transferlab": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "git": git_sha(),
    }


def git_sha() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None
