"""Fine-tuning strategies as data: which stages run, what trains in each.

full           every parameter trains from the first step (the reference's "fine-tune")
linear-probe   the backbone is frozen; its pooled features are computed once (eval mode, so
               BatchNorm statistics cannot move) and only the head trains, in seconds
lp-ft          a linear probe first, then everything trains at --lr (Kumar et al. 2022:
               a fitted head keeps fine-tuning from distorting the pretrained features)
gradual        epoch 1 trains the head; each later epoch unfreezes the next block group down
               (timm's coarse `group_matcher`) until everything trains (Howard & Ruder 2018)
layer-decay    everything trains; each block group's LR is --layer-decay times the one above
               it, the head at --lr (timm's `param_groups_layer_decay`, as in BEiT)

Frozen parameters get no gradient, and the modules that hold them stay in eval mode, so their
BatchNorm statistics cannot move either.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import timm.models
import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from . import checkpoint, evaluate, linear, models
from .config import UserError

STRATEGIES = ("full", "linear-probe", "lp-ft", "gradual", "layer-decay")


def block_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per block group, input side first, the head last (coarse group_matcher)."""
    if not hasattr(model, "group_matcher"):
        raise UserError(
            f"{type(model).__name__} has no group_matcher, which gradual, layer-decay and "
            "--freeze N need; use --strategy full, linear-probe or lp-ft, --freeze none or backbone"
        )
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def train_only(model: nn.Module, names: set[str]) -> list[nn.Module]:
    """Make only the named parameters trainable; returns the modules to keep in eval mode.

    Those are the modules whose own parameters are all frozen (timm's BatchNormAct2d included:
    it has children, so "leaf modules" would miss it).
    """
    for name, p in model.named_parameters():
        p.requires_grad = name in names
    return [
        m
        for m in model.modules()
        if list(m.parameters(recurse=False))
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def gradual_stage(groups: list[list[str]], epoch: int) -> set[str]:
    """The parameters that train in `epoch` (1-based): the top `epoch` block groups."""
    return {name for group in groups[-min(epoch, len(groups)) :] for name in group}


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, decay: float) -> list:
    """Optimizer param groups with LR lr * decay**(depth from the top); no decay on 1-d params."""
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


def features(
    model: nn.Module,
    images: np.ndarray,
    prep: dict,
    precision: str,
    batch_size: int = 256,
    desc: str = "features",
    quiet: bool = True,
    cache: Path | None = None,
    backbone: str = "",
) -> torch.Tensor:
    """Pooled pre-logit features (N, F) of a decoded split, the model in eval mode.

    `cache` (a folder) with `backbone` (the frozen backbone's fingerprint): features are stored
    under a digest of what they depend on (backbone, preprocessing, precision, the decoded
    pixels) and reused by any later run of the same frozen backbone on the same images: a
    second seed, another probe strength, a recipe rerun skip the forward passes.
    """
    path = None
    if cache is not None and backbone:
        h = hashlib.sha256(json.dumps([backbone, prep, precision], sort_keys=True).encode())
        h.update(np.ascontiguousarray(images).data)
        path = Path(cache) / "features" / f"{h.hexdigest()[:32]}.npy"
        cached = _load_cached_features(path, len(images))
        if cached is not None:
            return torch.from_numpy(cached).to(evaluate.device())
    out = evaluate.predict(model, images, prep, precision, batch_size, desc, quiet, True)
    if path is not None:
        with checkpoint.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, out)
    return torch.from_numpy(out).to(evaluate.device())


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
    prep: dict,
    precision: str,
    l2: float | str,
    log,
    quiet: bool = True,
    batch_size: int = 256,
    cache: Path | None = None,
) -> tuple[list, dict]:
    """Fit the head as an L2-regularised logistic regression on cached, standardised features.

    The regression is solved to convergence by full-batch L-BFGS (the linear-evaluation
    protocol of SimCLR/CLIP, scikit-learn's `LogisticRegression`), which is both faster and
    better than epochs of SGD on features: no learning rate to tune. The penalty pulls the
    weights towards the head the model started with (L2-SP), so a head initialised by
    `--head-init match` keeps its ImageNet rows unless the data disagree. `l2="auto"` picks
    the strength in linear.PROBE_L2 with the lowest 5-fold cross-validated NLL on train (`cv_strength`),
    so val stays untouched by the probe and honest for the ensembles fitted on it (a 10% val
    split picked strengths from 0.001 to 0.3 for the same features; CV picks 0.003-0.01).
    Every split's features are computed once (and kept in `cache`, see `features`).
    Returns (one history row per strength, best record with its "val_logits", "test_logits"
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
    backbone = backbone_sha256(model) if cache is not None else ""
    feats = {
        s: features(model, x, prep, precision, batch_size, f"features {s}", quiet, cache, backbone)
        for s, x in images.items()
    }
    strengths = linear.l2_strengths(l2)
    chosen, cv_loss = linear.cv_strength(
        feats["train"], labels["train"], head.weight, head.bias, strengths
    )
    rows, best = linear.fit_linear(
        feats, labels, head.weight, head.bias, strengths, log, "probe", chosen
    )
    if cv_loss is not None:
        for row, loss in zip(rows, cv_loss, strict=True):
            row["cv_loss"] = float(loss)
    with torch.no_grad():
        head.weight.copy_(best.pop("weight"))
        head.bias.copy_(best.pop("bias"))
        if "test" in feats:
            best["test_logits"] = evaluate.head_logits(model, feats["test"].cpu().numpy())
    best["features"] = {s: f.cpu().numpy() for s, f in feats.items()}
    how = "lowest 5-fold CV NLL on train" if cv_loss is not None else "as set"
    log(f"   stage probe: l2 {best['l2']:g} ({how}), val {best['val_acc']:.2%}")
    return rows, best
