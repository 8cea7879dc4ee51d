"""Ensembles of trained runs, whatever their architecture, input size or channels.

Each member predicts the raw images through its own preprocessing; combiners are pure functions
of member log-probabilities (M, N, K), so they are fast and testable without any model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from . import checkpoint, data, evaluate, plots
from .config import UserError

ENSEMBLE = "ensemble.json"
SPLITS = ("val", "test")


# ----------------------------------------------------------------------------- combiners


def combine_soft(logp: np.ndarray, weights=None) -> np.ndarray:
    """Mean probability. logp: (M, N, K) member log-probs -> (N, K) log-probs."""
    return combine_weighted(logp, np.full(len(logp), 1.0 / len(logp)))


def combine_logit(logp: np.ndarray, weights=None) -> np.ndarray:
    """Mean log-probability (a geometric mean of probabilities), renormalised."""
    return evaluate.log_softmax(logp.mean(axis=0))


def combine_hard(logp: np.ndarray, weights=None) -> np.ndarray:
    """Majority vote; ties broken by summed probability. Returns log of (votes + mean p)/(M+1)."""
    m, n, k = logp.shape
    votes = np.zeros((n, k))
    np.add.at(votes, (np.arange(n)[None, :].repeat(m, 0), logp.argmax(axis=2)), 1.0)
    mean_p = np.exp(logp).mean(axis=0)
    return np.log((votes + mean_p) / (m + 1))


def combine_weighted(logp: np.ndarray, weights) -> np.ndarray:
    """Weighted mean probability with non-negative weights summing to one."""
    w = np.asarray(weights, dtype=np.float64)
    return logsumexp(logp + np.log(np.maximum(w, 1e-300))[:, None, None], axis=0)


def fit_weights(logp: np.ndarray, targets: np.ndarray, split: str) -> np.ndarray:
    """Weights (softmax-parametrised) minimising the ensemble's NLL on a fitting split."""
    if split == "test":
        raise ValueError("refusing to fit ensemble weights on the test split")
    picked = logp[:, np.arange(len(targets)), targets]  # (M, N)

    def nll(theta):
        w = softmax(theta)
        return -logsumexp(picked + np.log(w)[:, None], axis=0).mean()

    res = minimize(nll, np.zeros(len(logp)), method="L-BFGS-B")
    return softmax(res.x)


COMBINERS = {
    "soft": combine_soft,
    "hard": combine_hard,
    "logit": combine_logit,
    "weighted": combine_weighted,
}
FITTED = {"weighted"}  # methods whose parameters are fitted on the validation split


# ----------------------------------------------------------------------------- members


def check_classes(metas: list[dict], runs: list[str]) -> list[np.ndarray]:
    """Per member, the column order that aligns its classes with the first member's."""
    ref = metas[0]["classes"]
    orders = []
    for meta, run in zip(metas, runs, strict=True):
        if set(meta["classes"]) != set(ref):
            extra = sorted(set(meta["classes"]) - set(ref))[:5]
            missing = sorted(set(ref) - set(meta["classes"]))[:5]
            raise UserError(
                f"members have different classes: {run} vs {runs[0]} "
                f"(only in {run}: {extra}; only in {runs[0]}: {missing})"
            )
        index = {c: i for i, c in enumerate(meta["classes"])}
        orders.append(np.array([index[c] for c in ref]))
    return orders


def member_logp(
    runs: list[str], data_spec: str | None = None, quiet: bool = False
) -> tuple[dict, dict, list[dict], str]:
    """Member log-probs per split, aligned to the first member's classes.

    Uses each run's cached logits when the data agree; otherwise each member predicts the raw
    images through its own preprocessing (decoded once per distinct size/channels).
    Returns ({split: (M, N, K)}, {split: targets}, metas, data_spec).
    """
    metas = [checkpoint.read_meta(r) for r in runs]
    orders = check_classes(metas, runs)
    spec = data_spec or metas[0]["data"]
    key0 = (spec, metas[0].get("val_fraction"), metas[0].get("limit"))
    cached = all((m["data"], m.get("val_fraction"), m.get("limit")) == key0 for m in metas)
    logp, targets = {}, {}
    if cached and all(checkpoint.load_logits(r, s) is not None for r in runs for s in SPLITS):
        for run, meta in zip(runs, metas, strict=True):  # every member must be a sound, safe run
            checkpoint.load_run_weights(run, meta)
        for split in SPLITS:
            pairs = [checkpoint.load_logits(r, split) for r in runs]
            logp[split] = np.stack(
                [evaluate.log_softmax(lg[:, o]) for (lg, _), o in zip(pairs, orders, strict=True)]
            )
            targets[split] = pairs[0][1]
        return logp, targets, metas, spec
    ds = data.load(spec, metas[0].get("val_fraction", 0.1), metas[0].get("limit"))
    per_member = {split: [] for split in SPLITS}
    for run, meta in zip(runs, metas, strict=True):
        model = evaluate.load_run_model(run, meta)  # verified against its sha256
        for split in SPLITS:
            lg = evaluate.predict_split(model, meta, ds, split, f"run {run}", quiet)
            per_member[split].append(evaluate.log_softmax(lg))
    for split in SPLITS:
        logp[split] = np.stack(per_member[split])
        targets[split] = ds.splits[split].labels
    return logp, targets, metas, spec


# ----------------------------------------------------------------------------- ensemble folder


def build(
    runs: list[str], method: str, out: str | Path, data_spec: str | None = None, quiet: bool = False
) -> dict:
    """Combine runs with `method`, fit what needs fitting on val, write the ensemble folder."""
    if method not in COMBINERS:
        raise UserError(f"unknown ensemble method '{method}' (known: {', '.join(COMBINERS)})")
    if len(runs) < 2:
        raise UserError("an ensemble needs at least two runs")
    t0 = time.time()
    runs = [str(r) for r in runs]
    logp, targets, metas, spec = member_logp(runs, data_spec, quiet)
    weights = (
        fit_weights(logp["val"], targets["val"], "val")
        if method in FITTED
        else np.full(len(runs), 1.0 / len(runs))
    )
    out = Path(out)
    results, members = {}, []
    for split in SPLITS:
        combined = COMBINERS[method](logp[split], weights)
        checkpoint.save_logits(out, split, combined, targets[split])
        results[split] = evaluate.metrics(combined, targets[split])
    for run, meta, i in zip(runs, metas, range(len(runs)), strict=True):
        members.append(
            {
                "run": str(Path(run).resolve()),
                "arch": meta["arch"],
                "input_size": meta["preprocessing"]["input_size"],
                "channels": meta["preprocessing"]["channels"],
                "weight": float(weights[i]),
                "test": evaluate.metrics(logp["test"][i], targets["test"]),
            }
        )
    best = max(m["test"]["top1"] for m in members)
    info = {
        "format": 1,
        "method": method,
        "members": members,
        "fitted_on": "val" if method in FITTED else None,
        "data": spec,
        "classes": metas[0]["classes"],
        "class_names": metas[0]["class_names"],
        "metrics": results,
        "gain_over_best_member": results["test"]["top1"] - best,
        "seconds": round(time.time() - t0, 2),
    }
    checkpoint.write_json(out / ENSEMBLE, info)
    return info


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE).is_file()


def read(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / ENSEMBLE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {Path(path) / ENSEMBLE}: {err}") from None


def evaluate_ensemble(
    path: str | Path, data_spec: str | None, split: str, quiet: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Recompute an ensemble's combined log-probs on a split from its members' runs."""
    info = read(path)
    runs = [m["run"] for m in info["members"]]
    metas = [checkpoint.read_meta(r) for r in runs]
    check_classes(metas, runs)
    ds = data.load(
        data_spec or info["data"], metas[0].get("val_fraction", 0.1), metas[0].get("limit")
    )
    per_member = [
        evaluate.log_softmax(
            evaluate.predict_split(
                evaluate.load_run_model(run, meta), meta, ds, split, f"run {run}", quiet
            )
        )
        for run, meta in zip(runs, metas, strict=True)
    ]
    weights = np.array([m["weight"] for m in info["members"]])
    combined = COMBINERS[info["method"]](np.stack(per_member), weights)
    return combined, ds.splits[split].labels, info


def evaluate_path(
    path: str | Path, data_spec: str | None = None, split: str = "test", quiet: bool = True
) -> dict:
    """Score a run or an ensemble folder from its saved files; writes its confusion matrix."""
    path = Path(path)
    if is_ensemble(path):
        logp, targets, info = evaluate_ensemble(path, data_spec, split, quiet)
        names, spec = info["class_names"], data_spec or info["data"]
    else:
        meta = checkpoint.read_meta(path)
        spec = data_spec or meta["data"]
        ds = data.load(spec, meta.get("val_fraction", 0.1), meta.get("limit"))
        model = evaluate.load_run_model(path, meta)
        logp = evaluate.predict_split(model, meta, ds, split, f"run {path}", quiet)
        targets, names = ds.splits[split].labels, ds.names
    result = evaluate.metrics(logp, targets)
    figure = path / ("confusion.png" if split == "test" else f"confusion-{split}.png")
    matrix = evaluate.confusion(logp.argmax(1), targets, len(names))
    plots.confusion(
        matrix, names, figure, f"{path.name} on {spec} [{split}]: top-1 {result['top1']:.2%}"
    )
    return {"metrics": result, "data": spec, "confusion": str(figure)}
