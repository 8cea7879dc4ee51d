"""Combiners: pure functions of member log-probabilities (M, N, K) — or, for fusion, of the
members' concatenated pooled features (N, F) — returning (N, K) log-probabilities. Fast and
testable without any model. Each is one record of the COMBINERS table: how it is fitted (if at
all), how it applies, what it takes, and what it is fitted on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from . import evaluate, linear
from .config import UserError


def _uniform(logp: np.ndarray, weights) -> np.ndarray:
    """Member weights summing to one: `weights` (e.g. a bagged member's folds sharing one
    member's weight), or uniform."""
    if weights is None:
        return np.full(len(logp), 1.0 / len(logp))
    return np.asarray(weights, dtype=np.float64) / np.sum(weights)


def combine_soft(logp: np.ndarray, weights=None) -> np.ndarray:
    """Mean probability. logp: (M, N, K) member log-probs -> (N, K) log-probs."""
    return combine_weighted(logp, _uniform(logp, weights))


def combine_logit(logp: np.ndarray, weights=None) -> np.ndarray:
    """Mean log-probability (a geometric mean of probabilities), renormalised."""
    return evaluate.log_softmax(np.tensordot(_uniform(logp, weights), logp, axes=1))


def combine_hard(logp: np.ndarray, weights=None) -> np.ndarray:
    """Majority vote; ties broken by summed probability. Returns log of (votes + mean p)/(M+1)
    (votes weighted by member weight times M)."""
    m, n, k = logp.shape
    w = _uniform(logp, weights)
    votes = np.zeros((n, k))
    np.add.at(votes, (np.arange(n)[None, :].repeat(m, 0), logp.argmax(axis=2)), m * w[:, None])
    mean_p = np.tensordot(w, np.exp(logp), axes=1)
    return np.log((votes + mean_p) / (m + 1))


def combine_weighted(logp: np.ndarray, weights) -> np.ndarray:
    """Weighted mean probability with non-negative weights summing to one."""
    w = np.asarray(weights, dtype=np.float64)
    mean_p = np.tensordot(w, np.exp(logp), axes=1)  # log-probs <= 0: exp cannot overflow
    return np.log(np.maximum(mean_p, 1e-300))


def fit_weights(logp: np.ndarray, targets: np.ndarray, split: str) -> np.ndarray:
    """Weights (softmax-parametrised) minimising the ensemble's NLL on a fitting split."""
    refuse_test(split)
    picked = logp[:, np.arange(len(targets)), targets]  # (M, N)

    def nll(theta):
        w = softmax(theta)
        return -logsumexp(picked + np.log(w)[:, None], axis=0).mean()

    res = minimize(nll, np.zeros(len(logp)), method="L-BFGS-B")
    return softmax(res.x)


def fit_select(logp: np.ndarray, targets: np.ndarray, split: str, rounds: int = 0) -> np.ndarray:
    """Greedy forward selection with replacement (Caruana et al. 2004), on a fitting split.

    Each round adds the member (again, if it helps most) whose inclusion gives the lowest NLL
    of the mean probability; the best-scoring round's counts, normalised, are the weights.
    """
    refuse_test(split)
    picked = np.exp(logp[:, np.arange(len(targets)), targets])  # (M, N) p(true class)
    counts, total = np.zeros(len(logp)), np.zeros(len(targets))
    best, best_counts = np.inf, None
    for r in range(1, (rounds or 4 * len(logp)) + 1):
        nll = -np.log((total[None] + picked) / r + 1e-300).mean(axis=1)
        m = int(nll.argmin())
        counts[m] += 1
        total += picked[m]
        if nll[m] < best - 1e-12:
            best, best_counts = nll[m], counts.copy()
    return best_counts / best_counts.sum()


def stacking_inputs(logp: np.ndarray) -> np.ndarray:
    """(M, N, K) log-probs -> (N, M*K) features, clipped so a zero probability stays finite."""
    return np.maximum(logp, -30.0).transpose(1, 0, 2).reshape(logp.shape[1], -1)


STACKING_L2 = (1000.0, 100.0, 10.0, 1.0, 0.1, 0.01)  # strong (the logit ensemble) to weak


def fit_stacking(logp: np.ndarray, targets: np.ndarray, split: str, folds: int = 5) -> dict:
    """Multinomial logistic regression on member log-probs (N, M*K), fitted on the fitting
    split; its L2 strength chosen by stratified cross-validation on that split (lowest NLL,
    `linear.cv_strength`).

    The penalty pulls towards the logit ensemble (each class's score = the mean of the members'
    log-probs for it), so strong regularisation falls back to averaging, and the stacker only
    departs from it where the data support that: with a few hundred images a free stacker
    over M*K inputs over-fits.
    """
    import torch

    refuse_test(split)
    m, n, k = logp.shape
    x = torch.from_numpy(stacking_inputs(logp)).float()
    w0 = torch.zeros(k, m * k)
    w0[np.arange(k).repeat(m), (np.arange(m)[None] * k + np.arange(k)[:, None]).ravel()] = 1 / m
    b0 = torch.zeros(k)
    lam, _ = linear.cv_strength(x, targets, w0, b0, STACKING_L2, folds)
    lam = STACKING_L2[0] if lam is None else lam  # too few images to fold: the strongest
    quiet = lambda *a: None  # noqa: E731
    _, best = linear.fit_linear(
        {"train": x, "val": x}, {"train": targets, "val": targets}, w0, b0, lam, quiet, "stacking"
    )
    return {"coef": best["weight"].numpy(), "intercept": best["bias"].numpy(), "l2": np.array(lam)}


def combine_stacking(logp: np.ndarray, params: dict) -> np.ndarray:
    return evaluate.log_softmax(stacking_inputs(logp) @ params["coef"].T + params["intercept"])


def fit_fusion(feats: dict, targets: dict, log=lambda *a: None) -> dict:
    """Fusion: a linear head on the members' concatenated pooled features (N, F), fitted on
    train and regularised by val: an L2 logistic regression path, warm-started from strong to
    weak (the early stopping of a linear model), keeping the strength that scores best on val.
    """
    import torch

    k = int(max(targets["train"].max(), targets["val"].max())) + 1
    tf = {s: torch.from_numpy(feats[s]).float() for s in ("train", "val")}
    zeros_w, zeros_b = torch.zeros(k, tf["train"].shape[1]), torch.zeros(k)
    _, best = linear.fit_linear(tf, targets, zeros_w, zeros_b, "auto", log, "fusion")
    return {
        "fusion_weight": best["weight"].cpu().numpy(),
        "fusion_bias": best["bias"].cpu().numpy(),
        "fusion_l2": np.array(best["l2"]),
    }


def combine_fusion(feats: np.ndarray, params: dict) -> np.ndarray:
    """(N, F) concatenated member features -> (N, K) log-probs."""
    return evaluate.log_softmax(feats @ params["fusion_weight"].T + params["fusion_bias"])


def refuse_test(split: str) -> None:
    """Nothing is ever fitted on the test split."""
    if split == "test":
        raise ValueError("refusing to fit an ensemble on the test split")


@dataclass(frozen=True)
class Combiner:
    """One way to combine members: what it takes, how it is fitted (if at all), how it applies."""

    apply: Callable  # (inputs, params) -> (N, K) log-probs
    fit: Callable | None = None  # log-probs: (logp, targets, split) -> params; features: see fusion
    inputs: str = "log-probs"  # log-probs (M, N, K) | features (N, F): the members' concatenated
    fitted_on: str | None = None  # None | "val" | "train" (fusion; its L2 strength chosen on val)


def _weights(fitter: Callable) -> Callable:
    return lambda logp, targets, split: {"weights": fitter(logp, targets, split)}


def _weighted(logp: np.ndarray, params: dict) -> np.ndarray:
    return combine_weighted(logp, params["weights"])


COMBINERS = {
    "soft": Combiner(lambda logp, params: combine_soft(logp, params.get("weights"))),
    "hard": Combiner(lambda logp, params: combine_hard(logp, params.get("weights"))),
    "logit": Combiner(lambda logp, params: combine_logit(logp, params.get("weights"))),
    "weighted": Combiner(_weighted, _weights(fit_weights), fitted_on="val"),
    "select": Combiner(_weighted, _weights(fit_select), fitted_on="val"),
    "stacking": Combiner(combine_stacking, fit_stacking, fitted_on="val"),
    "fusion": Combiner(combine_fusion, fit_fusion, inputs="features", fitted_on="train"),
}
FITTED = {name for name, c in COMBINERS.items() if c.fitted_on}


def fit(method: str, logp: np.ndarray, targets: np.ndarray, split: str) -> dict:
    """A log-prob combiner's parameters (member weights, the stacker's coefficients), fitted on
    `split` (never test); uniform member weights unless fitted."""
    c = COMBINERS[method]
    if c.fitted_on:
        refuse_test(split)
    if c.inputs == "features":
        raise UserError(f"{method} is fitted on member features (ensembles.build), not log-probs")
    return {
        "weights": np.full(len(logp), 1.0 / len(logp)),
        **(c.fit(logp, targets, split) if c.fit else {}),
    }


def combine(method: str, logp: np.ndarray, params: dict, feats: np.ndarray | None = None):
    """(N, K) log-probs of the ensemble from member log-probs (or, for fusion, features)."""
    c = COMBINERS[method]
    return c.apply(feats if c.inputs == "features" else logp, params)


def accounting(logp: np.ndarray, combined: np.ndarray, targets: np.ndarray) -> dict:
    """How much the ensemble helped, honestly: versus the best and the mean member, the
    oracle (some member is right) and how often members disagree (mean over pairs)."""
    members = [evaluate.metrics(lp, targets) for lp in logp]
    ens = evaluate.metrics(combined, targets)
    pred = logp.argmax(axis=2)  # (M, N)
    m = len(logp)
    pairs = [(pred[i] != pred[j]).mean() for i in range(m) for j in range(i + 1, m)]
    top1 = [r["top1"] for r in members]
    return {
        "gain_over_best_member": ens["top1"] - max(top1),
        "gain_over_mean_member": ens["top1"] - float(np.mean(top1)),
        "oracle_top1": float((pred == targets[None]).any(axis=0).mean()),
        "disagreement": float(np.mean(pairs)) if pairs else 0.0,
    }
