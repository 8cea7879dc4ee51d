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

import math

import numpy as np
import timm.models
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

from . import evaluate
from .config import UserError

STRATEGIES = ("full", "linear-probe", "lp-ft", "gradual", "layer-decay")


def block_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per block group, input side first, the head last (coarse group_matcher)."""
    if not hasattr(model, "group_matcher"):
        raise UserError(
            f"{type(model).__name__} has no group_matcher, which gradual and layer-decay need; "
            "use --strategy full, linear-probe or lp-ft"
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
) -> torch.Tensor:
    """Pooled pre-logit features (N, F) of a decoded split, the model in eval mode."""
    out = evaluate.predict(model, images, prep, precision, batch_size, desc, quiet, True)
    return torch.from_numpy(out).to(evaluate.device())


PROBE_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # the sweep of `--lr auto` for a linear probe


def linear_probe(
    model: nn.Module,
    images: dict,
    labels: dict,
    prep: dict,
    precision: str,
    epochs: int,
    lr: float | str,
    seed: int,
    log,
    quiet: bool = True,
    batch_size: int = 256,
) -> tuple[list, dict]:
    """Train only the head on cached features; returns (history rows, best-epoch record).

    `lr="auto"` fits the head once per rate in PROBE_LRS (seconds each: the features are
    cached) and keeps the rate whose best epoch scores highest on val. The model's head ends
    holding the best epoch's weights; the record carries their val logits.
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
    feats = {
        s: features(model, images[s], prep, precision, batch_size, f"features {s}", quiet)
        for s in ("train", "val")
    }
    ys = {s: torch.as_tensor(labels[s]).to(feats[s].device) for s in feats}
    start = {k: v.detach().clone() for k, v in head.state_dict().items()}
    fits = []
    for rate in PROBE_LRS if lr == "auto" else (lr,):
        head.load_state_dict(start)
        rows, best = _fit_head(head, feats, ys, labels["val"], epochs, rate, seed)
        fits.append((best["val_acc"], -best["val_loss"], rate, rows, best))
        if lr == "auto":
            log(f"   probe lr {rate:g}: best val {best['val_acc']:.2%} (epoch {best['epoch']})")
    *_, rate, rows, best = max(fits, key=lambda f: f[:2])
    head.load_state_dict(best["head"])
    with torch.no_grad():
        best["val_logits"] = head(feats["val"]).float().cpu().numpy()
    best["lr"] = rate
    log(
        f"   stage probe: lr {rate:g}, best epoch {best['epoch']} of {epochs}, "
        f"val {best['val_acc']:.2%}"
    )
    return rows, best


def _fit_head(head: nn.Linear, feats: dict, ys: dict, val_labels, epochs: int, lr: float, seed):
    """AdamW + cosine on cached features; the best epoch on val (top-1, then loss) is kept."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = math.ceil(len(ys["train"]) / 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    g = torch.Generator().manual_seed(seed)
    rows, best = [], {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "head": None}
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(ys["train"]), generator=g)
        loss_sum = correct = 0.0
        for idx in order.split(256):
            logits = head(feats["train"][idx])
            loss = F.cross_entropy(logits, ys["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == ys["train"][idx]).sum().item()
        with torch.no_grad():
            val = evaluate.metrics(head(feats["val"]).cpu().numpy(), val_labels)
        n = len(ys["train"])
        rows.append(
            {
                "epoch": epoch,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": loss_sum / n,
                "train_acc": correct / n,
                "val_loss": val["loss"],
                "val_acc": val["top1"],
                "seconds": 0.0,
            }
        )
        if evaluate.improves(val, best):
            best = {
                "val_acc": val["top1"],
                "val_loss": val["loss"],
                "epoch": epoch,
                "head": {k: v.detach().clone() for k, v in head.state_dict().items()},
            }
    return rows, best
