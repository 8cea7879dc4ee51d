"""L2-regularised multinomial logistic regression on features, shared by linear probes, stacking
and fusion: full-batch L-BFGS to convergence, its strength chosen by cross-validation or on a
held-out split, the penalty pulling towards a given starting point (L2-SP)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import evaluate
from .config import UserError

PROBE_L2 = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)  # `--probe-l2 auto`: strong to weak


def l2_strengths(l2) -> tuple:
    """One strength, a tuple of them, or "auto" (PROBE_L2), as a tuple."""
    return PROBE_L2 if l2 == "auto" else tuple(l2) if isinstance(l2, tuple) else (l2,)


def cv_strength(
    x: torch.Tensor, y, w_init: torch.Tensor, b_init: torch.Tensor, strengths: tuple, folds: int = 5
) -> tuple[float | None, np.ndarray | None]:
    """The strength with the lowest k-fold cross-validated NLL of `fit_linear` on (x, y), and
    the CV NLL of each; (None, None) for a single strength or too few images to fold.
    Folds are stratified where every class has two images, and fixed (seeded 0)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    y = np.asarray(y)
    n = len(y)
    if len(strengths) < 2 or n < 4:
        return None, None
    smallest = np.bincount(y).min(initial=0) if len(set(y.tolist())) > 1 else 0
    cv = (
        StratifiedKFold(min(folds, smallest), shuffle=True, random_state=0)
        if smallest >= 2
        else KFold(min(folds, n), shuffle=True, random_state=0)
    )
    loss = np.zeros(len(strengths))
    for fit_idx, held_idx in cv.split(np.zeros(n), y):
        fit_t, held_t = (torch.as_tensor(i, device=x.device) for i in (fit_idx, held_idx))
        feats = {"train": x[fit_t], "val": x[held_t]}
        labels = {"train": y[fit_idx], "val": y[held_idx]}
        rows, _ = fit_linear(feats, labels, w_init, b_init, strengths, lambda *a: None, "cv")
        loss += [r["val_loss"] * len(held_idx) for r in rows]
    loss = np.where(np.isfinite(loss), loss / n, np.inf)
    return strengths[int(np.argmin(loss))], loss


def oof_logits(
    x: torch.Tensor, y, w_init: torch.Tensor, b_init: torch.Tensor, l2: float, folds: list
) -> np.ndarray:
    """Out-of-fold logits (N, K) of `fit_linear` at strength `l2`: each fold's rows predicted
    by the regression fitted on the other folds (`folds`: their held-out index arrays)."""
    y = np.asarray(y)
    out = np.zeros((len(y), len(b_init)), dtype=np.float32)
    for held in folds:
        fit_idx = np.setdiff1d(np.arange(len(y)), held)
        fit_t, held_t = (torch.as_tensor(i, device=x.device) for i in (fit_idx, held))
        feats = {"train": x[fit_t], "val": x[held_t]}
        labels = {"train": y[fit_idx], "val": y[held]}
        _, best = fit_linear(feats, labels, w_init, b_init, l2, lambda *a: None, "cv")
        out[held] = best["val_logits"]
    return out


def fit_linear(
    feats: dict,
    labels: dict,
    w_init: torch.Tensor,
    b_init: torch.Tensor,
    l2,
    log,
    what: str,
    choose: float | None = None,
) -> tuple[list, dict]:
    """L2 logistic regression on standardised features (train), strength chosen on val.

    l2: one strength, a tuple of them (walked in order, warm-started), or "auto" (PROBE_L2).
    `choose`: keep that strength whatever val says (picked elsewhere, e.g. by `cv_strength`).
    feats: {"train", "val"}: (N, F) tensors; the penalty pulls towards (w_init, b_init) folded
    into standardised space. Returns (one row per strength, best record with its val logits
    and the fitted "weight" (K, F) and "bias" (K,) for the raw features).
    """
    mu, sd = feats["train"].mean(0), feats["train"].std(0, correction=0) + 1e-6
    z = {s: (f - mu) / sd for s, f in feats.items()}  # W x + b == (W sd) z + (b + W mu)
    ys = torch.as_tensor(labels["train"]).to(mu.device)
    with torch.no_grad():
        w0 = w_init.detach().float().to(mu.device) * sd
        b0 = b_init.detach().float().to(mu.device) + w_init.detach().float().to(mu.device) @ mu
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    rows, best = [], {"val_acc": -1.0, "val_loss": math.inf}
    strengths = l2_strengths(l2)
    for i, lam in enumerate(strengths, 1):
        t0 = time.time()
        _lbfgs(w, b, z["train"], ys, w0, lam)
        with torch.no_grad():
            train = evaluate.metrics((z["train"] @ w.T + b).cpu().numpy(), labels["train"])
            val_logits = (z["val"] @ w.T + b).cpu().numpy()
        val = evaluate.metrics(val_logits, labels["val"])
        rows.append(
            {
                "epoch": i,
                "lr": 0.0,
                "l2": lam,
                "train_loss": train["loss"],
                "train_acc": train["top1"],
                "val_loss": val["loss"],
                "val_acc": val["top1"],
                "seconds": time.time() - t0,
            }
        )
        log(f"   {what} l2 {lam:g}: train {train['top1']:.2%}, val {val['top1']:.2%}")
        keep = lam == choose if choose is not None else evaluate.improves(val, best)
        if keep:
            best = {
                "val_acc": val["top1"],
                "val_loss": val["loss"],
                "epoch": i,
                "l2": lam,
                "val_logits": val_logits,
                "wb": (w.detach().clone(), b.detach().clone()),
            }
    if "wb" not in best:
        raise UserError(f"the {what} diverged (non-finite loss at every L2 strength)")
    wz, bz = best.pop("wb")
    best["weight"], best["bias"] = wz / sd, bz - (wz / sd) @ mu
    return rows, best


def _lbfgs(w, b, z, y, w0, lam: float, max_iter: int = 100) -> None:
    """Minimise mean cross-entropy + lam/2 * |w - w0|^2 over (w, b), in place."""
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + lam / 2 * (w - w0).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
