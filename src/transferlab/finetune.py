"""Fine-tuning strategies as data: which stages run, what trains in each.

full           every parameter trains from the first step (the reference's "fine-tune")
linear-probe   the backbone is frozen; its pooled features are computed once (eval mode, so
               BatchNorm statistics cannot move) and only the head trains, in seconds
lp-ft          a linear probe first, then everything trains at --lr (Kumar et al. 2022:
               a fitted head keeps fine-tuning from distorting the pretrained features)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data, evaluate
from .config import UserError

STRATEGIES = ("full", "linear-probe", "lp-ft")


@torch.no_grad()
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
    model.eval()
    dev = evaluate.device()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=quiet, leave=False):
        x = torch.from_numpy(np.array(images[start : start + batch_size]))
        x = data.normalize(x, prep["mean"], prep["std"]).to(dev)
        with evaluate.autocast(precision):
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
    return torch.cat(out)


def linear_probe(
    model: nn.Module,
    images: dict,
    labels: dict,
    prep: dict,
    precision: str,
    epochs: int,
    lr: float,
    seed: int,
    log,
    quiet: bool = True,
) -> tuple[list, dict]:
    """Train only the head on cached features; returns (history rows, best-epoch record).

    The model's head ends holding the best epoch's weights (on val top-1).
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
        s: features(model, images[s], prep, precision, desc=f"features {s}", quiet=quiet)
        for s in ("train", "val")
    }
    ys = {s: torch.as_tensor(labels[s]).to(feats[s].device) for s in feats}
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
            val = evaluate.metrics(head(feats["val"]).cpu().numpy(), labels["val"])
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
    head.load_state_dict(best["head"])
    log(f"   stage probe: best epoch {best['epoch']} of {epochs}, val {best['val_acc']:.2%}")
    return rows, best
