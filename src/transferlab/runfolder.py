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
    from .trainer import Loop


def predict_all(loop: Loop, images: np.ndarray) -> np.ndarray:
    """Logits for every image; under DDP each rank predicts a padded shard, then all gather."""
    d, n = loop.dist, len(images)
    mine = d.shard(n) if d.world > 1 else slice(None)
    part = evaluate.predict(
        loop.model, images[mine], loop.prep, loop.precision, loop.cfg.eval_batch_size
    )
    return d.gather(part, n)


def write(
    out: Path,
    loop: Loop,
    ds,
    images,
    labels,
    source,
    history,
    best,
    seconds,
    probe_info: dict | None = None,
    val_logits: torch.Tensor | None = None,
    test_logits: torch.Tensor | None = None,
    features: dict | None = None,
    snapshot: dict | None = None,
) -> dict:
    """Write weights, logits, history, curves and meta.json (last: it marks the run complete).

    Every rank takes part in the predictions; only rank 0 writes. A linear probe's `features`
    (per split) go to the run's features/ cache, where ensembles (fusion) find them.
    """
    cfg, model = loop.cfg, loop.model
    arch = (
        cfg.model if source["weights"] != "run" else checkpoint.read_meta(source["parent"])["arch"]
    )
    logits = {
        "val": predict_all(loop, images["val"]) if val_logits is None else val_logits.numpy(),
        "test": predict_all(loop, images["test"]) if test_logits is None else test_logits.numpy(),
    }
    key = checkpoint.features_key(ds.spec, cfg.val_fraction, cfg.limit, "none")
    for split, f in (features or {}).items():
        if loop.dist.main and len(f) == len(ds.splits[split]):  # no image was skipped
            checkpoint.save_features(out, f"{split}-none", key, f)
    results = {split: evaluate.metrics(logits[split], labels[split]) for split in logits}
    best_row = next(r for r in history if r["epoch"] == best["epoch"])
    results["train"] = {
        "top1": best_row["train_acc"],
        "loss": best_row["train_loss"],
        "n": len(labels["train"]),
        "note": "augmented, during training",
    }
    meta = {
        "format": 1,
        "arch": arch,
        "num_classes": len(ds.classes),
        "classes": ds.classes,
        "class_names": ds.names,
        "preprocessing": loop.prep,
        "source": source,
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
        "probe": probe_info,
        "params": models.count_params(model),
        "trainable_params": models.count_params(model, trainable=True),
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "seconds": round(seconds, 1),
        "metrics": results,
        "versions": versions(),
        **({"snapshot": snapshot} if snapshot else {}),
    }
    if not loop.dist.main:
        return meta
    outputs.mark(out, "run")  # snapshots are runs of their own
    checkpoint.save_weights(out, model, arch, ds.classes)
    meta["weights_sha256"] = checkpoint.sha256(checkpoint.weights_path(out))
    for split, values in logits.items():
        checkpoint.save_logits(out, split, values, labels[split])
    write_history(out / "history.csv", history)
    plots.curves(history, out / "curves.png", f"{out.name}: {arch} on {ds.spec}")
    checkpoint.write_json(out / checkpoint.META, meta)
    return meta


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
