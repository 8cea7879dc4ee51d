"""The probe stage: a frozen backbone's pooled features, computed once (and cached), and the
head fitted on them as an L2-regularised logistic regression (linear.py)."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint, decoding, engines, evaluate, linear, models
from .config import UserError
from .folds import carving

if TYPE_CHECKING:
    from .resume import Progress
    from .trainer import Loop


def features(
    model: nn.Module,
    images: dict,
    prep: models.Preprocessing,
    precision: str,
    batch_size: int = 256,
    quiet: bool = True,
    cache: Path | None = None,
    engine: str = "auto",
    log=lambda *a: None,
    check=lambda where: None,
) -> dict:
    """Pooled pre-logit features {split: (N, F) tensor} of decoded splits {split: uint8 array},
    computed on the feature engine `engine` names (engines.py; "auto": the faster here).

    With a `cache` folder, features are stored under a digest of what they depend on (the
    frozen backbone, preprocessing, the engine and its precision, the decoded pixels) and reused
    by any later run of the same frozen backbone on the same images: a second seed, another
    probe strength, a recipe rerun skip the forward passes (and the engine's choice).
    """
    backbone = backbone_sha256(model) if cache is not None else ""
    paths = {s: {} for s in images}
    out = {}
    for split, x in images.items():
        for key in engines.keys(engine, precision):
            paths[split][key] = path = _cache_path(cache, model, prep, key, x, backbone)
            found = _load_cached_features(path, len(x)) if path else None
            if found is not None:
                out[split] = found
                break
    missing = [s for s in images if s not in out]
    if missing:
        n = sum(len(images[s]) for s in missing)
        chosen = engines.choose(
            engine, model, prep, precision, images[missing[0]], n, batch_size, log, cache
        )
        for split in missing:
            f = chosen.features(images[split], f"features {split}", quiet, check)
            path = paths[split].get(chosen.key)
            if path is not None:
                with checkpoint.atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, f)
            out[split] = f
    return {s: torch.from_numpy(out[s]).to(evaluate.device()) for s in images}


def _cache_path(cache, model, prep, key: str, images: np.ndarray, backbone: str) -> Path | None:
    if cache is None or not backbone:
        return None
    pooled, *views = models.feature_layout(model)
    made_of = [backbone, prep.to_dict(), pooled, key, *views]
    h = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode())
    pixels = getattr(images, "fingerprint", None)  # shards: which members, not their pixels
    h.update(pixels.encode() if pixels else np.ascontiguousarray(images).data)
    return Path(cache) / "features" / f"{h.hexdigest()[:32]}.npy"


def _load_cached_features(path: Path, n: int) -> np.ndarray | None:
    """A cached feature file if whole ((n, F) float32); a damaged one is rebuilt, not trusted."""
    if not path.is_file():
        return None
    try:
        feats = np.load(path, allow_pickle=False)
        if feats.ndim == 2 and len(feats) == n and feats.dtype == np.float32:
            return feats
    except (OSError, ValueError, EOFError):
        pass
    warnings.warn(f"feature cache entry {path.name} is damaged: rebuilding it", stacklevel=3)
    return None


def backbone_sha256(model: nn.Module) -> str:
    """A fingerprint of everything but the classifier: what frozen features depend on."""
    heads = models.head_keys(model)
    return checkpoint.state_sha256({k: v for k, v in model.state_dict().items() if k not in heads})


def linear_probe(
    model: nn.Module,
    images: dict,
    labels: dict,
    prep: models.Preprocessing,
    precision: str,
    l2: float | str,
    log,
    quiet: bool = True,
    batch_size: int = 256,
    cache: Path | None = None,
    engine: str = "auto",
    check=lambda where: None,
) -> tuple[list, dict]:
    """Fit the head as an L2-regularised logistic regression on cached, standardised features.

    The regression is solved to convergence by full-batch L-BFGS (the linear-evaluation
    protocol of SimCLR/CLIP, scikit-learn's `LogisticRegression`), which is both faster and
    better than epochs of SGD on features: no learning rate to tune. The penalty pulls the
    weights towards the head the model started with (L2-SP), so a head initialised by
    `--head-init match` keeps its ImageNet rows unless the data disagree. `l2="auto"` picks
    the strength in linear.PROBE_L2 with the lowest cross-validated NLL on train (`cv_strength`:
    5 folds, 3 from 10,000 images),
    so val stays untouched by the probe and honest for the ensembles fitted on it (a 10% val
    split picked strengths from 0.001 to 0.3 for the same features; CV picks 0.003-0.01),
    and the head is then fitted along the path from the grid's middle to that strength.
    Every split's features are computed once (and kept in `cache`, see `features`).
    Returns (one history row per strength fitted, best record with its "val_logits", "test_logits"
    and "features" per split); the model's head ends holding the best weights, folded back to
    raw features.
    """
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserError(
            f"linear probing needs a linear head; this model's is {type(head).__name__}"
        )
    total = sum(p.numel() for p in model.parameters())
    log(
        f"   stage probe: {sum(p.numel() for p in head.parameters()) / 1e6:.3f}M of "
        f"{total / 1e6:.2f}M parameters train (the head, on features computed once)"
    )
    feats = features(model, images, prep, precision, batch_size, quiet, cache, engine, log, check)
    strengths = linear.l2_strengths(l2)
    chosen, cv_loss = linear.cv_strength(
        feats["train"], labels["train"], head.weight, head.bias, strengths, precision=precision
    )
    path = strengths if chosen is None else linear.path_to(strengths, chosen)
    rows, best = linear.fit_linear(
        feats, labels, head.weight, head.bias, path, log, "probe", chosen
    )
    if cv_loss is not None:
        for row in rows:
            row["cv_loss"] = float(cv_loss[strengths.index(row["l2"])])
    with torch.no_grad():
        head.weight.copy_(best.pop("weight"))
        head.bias.copy_(best.pop("bias"))
        if "test" in feats:
            best["test_logits"] = evaluate.head_logits(model, feats["test"].cpu().numpy())
    best["features"] = {s: f.cpu().numpy() for s, f in feats.items()}
    folds = linear.strength_folds(len(labels["train"]))
    how = f"lowest {folds}-fold CV NLL on train" if cv_loss is not None else "as set"
    log(f"   stage probe: l2 {best['l2']:g} ({how}), val {best['val_acc']:.2%}")
    return rows, best


def stage(
    loop: Loop, progress: Progress, final: bool, log, quiet: bool, check=lambda where: None
) -> dict | None:
    """Run a probe stage: fit the head on the frozen backbone's features.

    A final probe (linear-probe) is the whole run: it scores val and test from its features and
    returns them per split for the run's features/ cache; one that precedes training (lp-ft)
    changes the head only and returns None (the backbone will change). `check(where)` runs
    between batches of the feature passes and raises to stop (SIGTERM, a deadline).
    """
    cfg, t0 = loop.cfg, time.time()
    rows, best = linear_probe(
        loop.model,
        loop.images if final else {s: loop.images[s] for s in ("train", "val")},
        loop.labels,
        loop.prep,
        evaluate.inference_precision(loop.precision),  # as evaluate computes its features here
        cfg.probe_l2,
        log,
        quiet,
        cfg.eval_batch_size,
        decoding.resolve_cache(cfg.cache_dir),
        cfg.feature_engine,
        check,
    )
    progress.probe = {
        "l2": best["l2"],
        "l2_setting": cfg.probe_l2,
        "val_acc": best["val_acc"],
        "seconds": round(time.time() - t0, 1),
    }
    state = {k: v.detach().clone().cpu() for k, v in loop.model.state_dict().items()}
    progress.best = {k: best[k] for k in ("val_acc", "val_loss", "epoch")} | {"state": state}
    if not final:  # lp-ft: the probe is epoch 0, kept unless a fine-tuned epoch beats it on val
        row = next(r for r in rows if r["l2"] == best["l2"])
        progress.history = [{k: v for k, v in row.items() if k != "l2"} | {"epoch": 0}]
        progress.best["epoch"] = 0
        return None
    if cfg.feature_engine == "onnxruntime":  # its features are fp32: evaluate must compute that
        loop.precision = "fp32"
    rows[0]["seconds"] += time.time() - t0 - sum(r["seconds"] for r in rows)  # features
    progress.history = rows
    progress.val_logits = torch.from_numpy(best["val_logits"])  # cached features: no 2nd pass
    progress.test_logits = torch.from_numpy(best["test_logits"])
    return best["features"]


def out_of_fold(cfg, run: Path, y: np.ndarray, folds: list) -> tuple[np.ndarray, np.ndarray]:
    """A probe's out-of-fold log-probs over train+val: its regression (at the strength the run
    chose) refitted on k-1 folds of its cached features, from the head it started from (what
    `transferlab auto` scores a probe candidate by)."""
    from . import distributed, trainer

    meta = checkpoint.read_meta(run)
    val_fraction, limit, fold = carving(meta)
    key = checkpoint.features_key(meta["data"], val_fraction, limit, "none", fold)
    parts = [checkpoint.load_features(run, f"{s}-none", key) for s in ("train", "val")]
    if any(p is None for p in parts):
        raise UserError(f"{run.name}: its features were not kept (unreadable images skipped?)")
    x = torch.from_numpy(np.concatenate(parts)).to(evaluate.device())
    head = trainer.setup(cfg, run, lambda *a, **k: None, distributed.setup()).model.get_classifier()
    logits = linear.oof_logits(x, y, head.weight, head.bias, meta["probe"]["l2"], folds)
    test = evaluate.log_softmax(checkpoint.load_logits(run, "test")[0])
    return evaluate.log_softmax(logits), test
