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
    x: torch.Tensor,
    y,
    w_init: torch.Tensor,
    b_init: torch.Tensor,
    strengths: tuple,
    folds: int | None = None,
    walk: bool = True,
    precision: str = "fp32",
) -> tuple[float | None, np.ndarray | None]:
    """The strength with the lowest k-fold cross-validated NLL of the regression on (x, y), and
    the CV NLL of each (NaN where not fitted); (None, None) for a single strength or too few
    images to fold. Folds are stratified where every class has two images, fixed (seeded 0);
    `folds` None: 5, or 3 from LARGE_CV images (`strength_folds`).

    `walk`: instead of fitting every strength, start in the middle of the grid and step
    towards the lower CV loss until it rises (`walk_order`): the same choice wherever the CV
    curve has one minimum on the grid (a regularisation path's usual shape), with 3-4 of
    PROBE_L2's 7 strengths fitted k times instead of all 7 (each fold warm-started from its
    previous fit). On 18,000 Tiny ImageNet features that is most of a probe's regression time.

    `precision` "bf16" (the run's, where the CPU has native bf16): the fits' two matmuls take
    bf16 features and weights (fp32 accumulation, fp32 loss and L-BFGS state): 2.6x faster
    matmuls here, and L-BFGS stops sooner on the rounded loss (71 evaluations instead of 108 on
    one fit). On Tiny ImageNet's Lite2 features the CV NLLs moved by at most 0.002 (the
    strengths' own differences: 0.003-0.04), the same strength won, and the search took 23 s
    instead of 118 s (2-core EPYC with AVX512-BF16). Only the choice is made so: the final fit
    (`fit_linear`) stays fp32.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    y = np.asarray(y)
    n = len(y)
    if len(strengths) < 2 or n < 4:
        return None, None
    folds = folds or strength_folds(n)
    smallest = np.bincount(y).min(initial=0) if len(set(y.tolist())) > 1 else 0
    cv = (
        StratifiedKFold(min(folds, smallest), shuffle=True, random_state=0)
        if smallest >= 2
        else KFold(min(folds, n), shuffle=True, random_state=0)
    )
    splits = list(cv.split(np.zeros(n), y))
    warm: list = [None] * len(splits)  # each fold's last fit, standardised space

    def cv_loss(lam: float) -> float:
        total = 0.0
        for f, (fit_idx, held_idx) in enumerate(splits):
            fit_t, held_t = (torch.as_tensor(i, device=x.device) for i in (fit_idx, held_idx))
            reg = Regression(x[fit_t], y[fit_idx], w_init, b_init, warm[f], precision)
            reg.fit(lam)
            warm[f] = reg.state()
            logits = reg.logits(x[held_t]).cpu().numpy()
            total += evaluate.metrics(logits, y[held_idx])["loss"] * len(held_idx)
        return total / n if math.isfinite(total) else math.inf

    loss = np.full(len(strengths), np.nan)
    order = walk_order(len(strengths)) if walk else iter(range(len(strengths)))
    i = next(order)
    while i is not None:
        loss[i] = cv_loss(strengths[i])
        i = order.send(loss[i]) if walk else next(order, None)
    return strengths[int(np.nanargmin(np.where(np.isnan(loss), np.inf, loss)))], loss


LARGE_CV = 10_000


def strength_folds(n: int) -> int:
    """5 folds; 3 from LARGE_CV images, where each held-out third still holds thousands (its
    loss's noise far below the grid's 3x steps) and 9 fits of 2/3 of the images replace 15 of
    4/5: on Tiny ImageNet's 18,000 that halves the probe's strength search."""
    return 3 if n >= LARGE_CV else 5


def walk_order(m: int):
    """A generator of grid indices to evaluate (send each one's loss back): from the middle
    towards weaker strengths while the loss falls, else towards stronger ones; None when done."""
    start = i = (m - 1) // 2
    best = yield i
    for step in (1, -1):
        j = i + step
        while 0 <= j < m:
            got = yield j
            if not got < best:
                break
            i, best, j = j, got, j + step
        if i != start:
            break
    yield None


def path_to(strengths: tuple, chosen: float) -> tuple:
    """The strengths a final fit walks (warm-started) from the grid's middle to `chosen`."""
    start, end = (len(strengths) - 1) // 2, strengths.index(chosen)
    step = 1 if end >= start else -1
    return tuple(strengths[start : end + step if end + step >= 0 else None : step])


# fp32 L-BFGS iterations after a bf16 fit: on a 2-core Xeon with AMX (bf16 matmuls 8x fp32's)
# the bf16 fit of the weakest strength stopped 1.05% above fp32's CV NLL (test_linear's 600 x 24
# problem; 0.008% after 5 more in fp32), for 7% more search time on 18,000 x 1,280 x 200
POLISH_ITERATIONS = 5


class Regression:
    """An L2 logistic regression on standardised features, pulled towards (w_init, b_init)
    folded into standardised space (W x + b == (W sd) z + (b + W mu)); fits warm-start from
    `state` (an earlier fit's) or from that starting point. `precision` "bf16": the fits'
    matmuls in bf16 (see `cv_strength`)."""

    def __init__(self, x: torch.Tensor, y, w_init, b_init, state=None, precision="fp32"):
        self.mu, self.sd = x.mean(0), x.std(0, correction=0) + 1e-6
        self.z = (x - self.mu) / self.sd
        self.matmul_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.y = torch.as_tensor(np.asarray(y)).to(x.device)
        with torch.no_grad():
            w_init = w_init.detach().float().to(x.device)
            self.w0 = w_init * self.sd
            b0 = b_init.detach().float().to(x.device) + w_init @ self.mu
        w, b = state if state is not None else (self.w0, b0)
        self.w, self.b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)

    def fit(self, lam: float) -> None:
        _lbfgs(self.w, self.b, self.z.to(self.matmul_dtype), self.y, self.w0, lam)
        if self.matmul_dtype != torch.float32:  # bf16's rounded loss stops L-BFGS early
            _lbfgs(self.w, self.b, self.z, self.y, self.w0, lam, max_iter=POLISH_ITERATIONS)

    def state(self) -> tuple:
        return self.w.detach().clone(), self.b.detach().clone()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mu) / self.sd) @ self.w.T + self.b

    def raw(self) -> tuple:
        """(weight (K, F), bias (K,)) for the raw features."""
        w = self.w.detach() / self.sd
        return w, self.b.detach() - w @ self.mu


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
    reg = Regression(feats["train"], labels["train"], w_init, b_init)
    rows, best = [], {"val_acc": -1.0, "val_loss": math.inf}
    for i, lam in enumerate(l2_strengths(l2), 1):
        t0 = time.time()
        reg.fit(lam)
        train = evaluate.metrics(reg.logits(feats["train"]).cpu().numpy(), labels["train"])
        val_logits = reg.logits(feats["val"]).cpu().numpy()
        val = evaluate.metrics(val_logits, labels["val"])
        rows.append(
            {
                "epoch": i,
                "lr": None,  # a regression has none (it read 0.0)
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
                "wb": reg.raw(),
            }
    if "wb" not in best:
        raise UserError(f"the {what} diverged (non-finite loss at every L2 strength)")
    best["weight"], best["bias"] = best.pop("wb")
    return rows, best


def _lbfgs(w, b, z, y, w0, lam: float, max_iter: int = 100) -> None:
    """Minimise mean cross-entropy + lam/2 * |w - w0|^2 over (w, b), in place; the logits'
    matmul in z's dtype (fp32, or bf16 with fp32 accumulation), the rest in fp32."""
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logits = (z @ w.to(z.dtype).T).float() + b
        loss = F.cross_entropy(logits, y) + lam / 2 * (w - w0).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
