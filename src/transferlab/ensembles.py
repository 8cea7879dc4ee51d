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

from . import checkpoint, data, evaluate, outputs, plots
from .config import UserError

ENSEMBLE = "ensemble.json"
PARAMS = "combiner.npz"  # the fitted combiner (weights; the stacker's coefficients)
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
    `finetune.cv_strength`).

    The penalty pulls towards the logit ensemble (each class's score = the mean of the members'
    log-probs for it), so strong regularisation falls back to averaging, and the stacker only
    departs from it where the data support that: with a few hundred images a free stacker
    over M*K inputs over-fits.
    """
    import torch

    from . import finetune

    refuse_test(split)
    m, n, k = logp.shape
    x = torch.from_numpy(stacking_inputs(logp)).float()
    w0 = torch.zeros(k, m * k)
    w0[np.arange(k).repeat(m), (np.arange(m)[None] * k + np.arange(k)[:, None]).ravel()] = 1 / m
    b0 = torch.zeros(k)
    lam, _ = finetune.cv_strength(x, targets, w0, b0, STACKING_L2, folds)
    lam = STACKING_L2[0] if lam is None else lam  # too few images to fold: the strongest
    quiet = lambda *a: None  # noqa: E731
    _, best = finetune.fit_linear(
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

    from . import finetune

    k = int(max(targets["train"].max(), targets["val"].max())) + 1
    tf = {s: torch.from_numpy(feats[s]).float() for s in ("train", "val")}
    zeros_w, zeros_b = torch.zeros(k, tf["train"].shape[1]), torch.zeros(k)
    _, best = finetune.fit_linear(tf, targets, zeros_w, zeros_b, "auto", log, "fusion")
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


COMBINERS = {
    "soft": combine_soft,
    "hard": combine_hard,
    "logit": combine_logit,
    "weighted": combine_weighted,
    "select": combine_weighted,
    "stacking": combine_stacking,
    "fusion": combine_fusion,  # on member features, not log-probs
}
FITTED = {"weighted", "select", "stacking", "fusion"}  # fitted on the validation split


def fit(method: str, logp: np.ndarray, targets: np.ndarray, split: str) -> dict:
    """The combiner's parameters: member weights, or the stacker's coefficients."""
    if method in FITTED:
        refuse_test(split)
    if method == "fusion":
        raise UserError("fusion is fitted on member features (ensembles.build), not log-probs")
    uniform = np.full(len(logp), 1.0 / len(logp))
    if method == "weighted":
        return {"weights": fit_weights(logp, targets, split)}
    if method == "select":
        return {"weights": fit_select(logp, targets, split)}
    if method == "stacking":
        return {"weights": uniform, **fit_stacking(logp, targets, split)}
    return {"weights": uniform}


def combine(method: str, logp: np.ndarray, params: dict, feats: np.ndarray | None = None):
    if method == "fusion":
        return combine_fusion(feats, params)
    return COMBINERS[method](logp, params if method == "stacking" else params["weights"])


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
    runs: list[str],
    data_spec: str | None = None,
    quiet: bool = False,
    tta: str = "none",
    splits: tuple[str, ...] = SPLITS,
    features: bool = False,
) -> tuple[dict, dict, list[dict], str, dict]:
    """Member log-probs per split, aligned to the first member's classes.

    Uses a run's cached logits when its data agree and no TTA is asked for; otherwise the
    member predicts the raw images through its own preprocessing (decoded once per distinct
    size/channels): its pooled pre-logit features, cached in the run folder's features/ per
    split and TTA, then its head. `features`: also return those, concatenated over members.
    Returns ({split: (M, N, K)}, {split: targets}, metas, data_spec, {split: (N, F)}).
    """
    metas = [checkpoint.read_meta(r) for r in runs]
    orders = check_classes(metas, runs)  # every member's columns in the first member's order
    for run, meta in zip(runs, metas, strict=True):  # before any member spends time predicting
        evaluate.check_tta(tta, meta["preprocessing"]["input_size"], f"run {run}")
    spec = data.canonical(data_spec or metas[0]["data"])
    ds = data.load(spec, metas[0].get("val_fraction", 0.1), metas[0].get("limit"))
    per_member = {split: [] for split in splits}
    per_member_feats = {split: [] for split in splits}
    targets = {}
    for run, meta, order in zip(runs, metas, orders, strict=True):
        saved = [checkpoint.load_logits(run, s) for s in splits]
        if tta == "none" and not features and same_data(meta, ds, metas[0]) and None not in saved:
            checkpoint.load_run_weights(run, meta)  # every member must be a sound, safe run
            for split, (lg, y) in zip(splits, saved, strict=True):
                per_member[split].append(evaluate.log_softmax(lg[:, order]))
                targets.setdefault(split, y)
            continue
        model = evaluate.load_run_model(run, meta)  # verified against its sha256
        who = f"run {run}"
        evaluate.class_map(meta["classes"], meta["class_names"], ds.classes, ds.names, who)
        key = checkpoint.features_key(spec, meta.get("val_fraction"), meta.get("limit"), tta)
        for split in splits:
            f = checkpoint.load_features(run, f"{split}-{tta}", key)
            if f is None:
                f = evaluate.predict_split(model, meta, ds, split, who, quiet, tta, True)
                checkpoint.save_features(run, f"{split}-{tta}", key, f)
            per_member_feats[split].append(f)
            lg = evaluate.head_logits(model, f)  # the run's own class order
            per_member[split].append(evaluate.log_softmax(lg[:, order]))
    if len(targets) < len(splits):  # some member predicted: targets in the first's class order
        first = metas[0]
        to_first = evaluate.class_map(
            first["classes"], first["class_names"], ds.classes, ds.names, f"run {runs[0]}"
        )
        targets = {split: to_first[ds.splits[split].labels] for split in splits}
    logp = {split: np.stack(per_member[split]) for split in splits}
    feats = (
        {split: np.concatenate(per_member_feats[split], axis=1) for split in splits}
        if features
        else {}
    )
    return logp, targets, metas, spec, feats


def same_data(meta: dict, ds: data.Dataset, first: dict) -> bool:
    """A run's cached logits are for `ds`: same spec, split carving and files (fingerprint)."""
    recorded = meta.get("data_fingerprint")  # runs made before fingerprints: trust the spec
    return (
        data.canonical(meta["data"]) == ds.spec
        and (meta.get("val_fraction"), meta.get("limit"))
        == (first.get("val_fraction"), first.get("limit"))
        and recorded in (None, ds.fingerprint)
    )


def check_members(info: dict, path: str | Path) -> list[dict]:
    """The members' metas, refusing any member whose weights changed since the ensemble was
    built (its fitted combiner and cached numbers would silently no longer match)."""
    metas = []
    for m in info["members"]:
        meta = checkpoint.read_meta(m["run"])
        if m.get("weights_sha256") and meta.get("weights_sha256") != m["weights_sha256"]:
            raise UserError(
                f"member {m['run']} changed since ensemble {path} was built (its weights' sha256 "
                "differs): rebuild the ensemble with transferlab ensemble ... --overwrite"
            )
        metas.append(meta)
    return metas


# ----------------------------------------------------------------------------- ensemble folder


def build(
    runs: list[str],
    method: str,
    out: str | Path,
    data_spec: str | None = None,
    quiet: bool = False,
    tta: str = "none",
    overwrite: bool = False,
) -> dict:
    """Combine runs with `method`, fit what needs fitting on val, write the ensemble folder.

    `tta`: each member averages its predictions (or, for fusion, its features) over views.
    An existing ensemble folder `out` is replaced only with `overwrite`.
    """
    if method not in COMBINERS:
        raise UserError(f"unknown ensemble method '{method}' (known: {', '.join(COMBINERS)})")
    if len(runs) < 2:
        raise UserError("an ensemble needs at least two runs")
    evaluate.check_tta(tta)  # each member's input size is checked when it predicts
    t0 = time.time()
    runs = [str(r) for r in runs]
    for run in runs:
        checkpoint.read_meta(run)  # each member is a finished run, named if not
    if len({str(Path(r).resolve()) for r in runs}) < len(runs) and not quiet:
        print("note: a run is listed more than once; it counts once per listing")
    outputs.refuse_overlap(out, runs, "member")
    outputs.check_out(Path(out), "ensemble", overwrite=overwrite)
    fusion = method == "fusion"
    splits = ("train", *SPLITS) if fusion else SPLITS
    logp, targets, metas, spec, feats = member_logp(runs, data_spec, quiet, tta, splits, fusion)
    if fusion:
        log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
        params = {"weights": np.full(len(runs), 1.0 / len(runs)), **fit_fusion(feats, targets, log)}
    else:
        params = fit(method, logp["val"], targets["val"], "val")
    out = Path(out)
    with outputs.lock(out):
        outputs.claim(out, "ensemble", outputs.check_out(out, "ensemble", overwrite=overwrite))
        return _write(out, method, runs, metas, spec, params, logp, targets, feats, tta, t0)


def _write(out: Path, method, runs, metas, spec, params, logp, targets, feats, tta, t0) -> dict:
    """The ensemble folder: combiner.npz, logits/, ensemble.json (last: marks it complete)."""
    fusion = method == "fusion"
    with checkpoint.atomic_path(out / PARAMS) as tmp, open(tmp, "wb") as f:
        np.savez(f, **params)
    results, members, combined = {}, [], {}
    for split in SPLITS:
        combined[split] = combine(method, logp[split], params, feats.get(split))
        checkpoint.save_logits(out, split, combined[split], targets[split])
        results[split] = evaluate.metrics(combined[split], targets[split])
    for run, meta, i in zip(runs, metas, range(len(runs)), strict=True):
        members.append(
            {
                "run": str(Path(run).resolve()),
                "weights_sha256": meta.get("weights_sha256"),
                "data_fingerprint": meta.get("data_fingerprint"),
                "arch": meta["arch"],
                "input_size": meta["preprocessing"]["input_size"],
                "channels": meta["preprocessing"]["channels"],
                "weight": float(params["weights"][i]),
                "test": evaluate.metrics(logp["test"][i], targets["test"]),
            }
        )
    fitted = method in FITTED
    info = {
        "format": 1,
        "method": method,
        "members": members,
        "fitted_on": "val" if fitted else None,
        "tta": tta,
        "splits": {
            "members": "trained on train; best epoch chosen on val",
            "combiner": (
                "fusion head fitted on train features, its L2 strength chosen on val"
                if fusion
                else f"{method} fitted on val"
                if fitted
                else "nothing fitted"
            ),
            "scored": "test",
        },
        "data": spec,
        "classes": metas[0]["classes"],
        "class_names": metas[0]["class_names"],
        "metrics": results,
        **accounting(logp["test"], combined["test"], targets["test"]),
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


def read_params(path: str | Path, info: dict) -> dict:
    file = Path(path) / PARAMS
    if not file.is_file():  # written before combiner.npz existed: weights only
        return {"weights": np.array([m["weight"] for m in info["members"]])}
    with np.load(file, allow_pickle=False) as z:
        return dict(z)


def evaluate_ensemble(
    path: str | Path, data_spec: str | None, split: str, quiet: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Recompute an ensemble's combined log-probs on a split from its members' runs."""
    info = read(path)
    check_members(info, path)
    runs = [m["run"] for m in info["members"]]
    method, tta = info["method"], info.get("tta", "none")
    logp, targets, _, _, feats = member_logp(
        runs, data_spec or info["data"], quiet, tta, (split,), method == "fusion"
    )
    combined = combine(method, logp[split], read_params(path, info), feats.get(split))
    return combined, targets[split], info


def evaluate_path(
    path: str | Path,
    data_spec: str | None = None,
    split: str = "test",
    quiet: bool = True,
    tta: str | None = None,
) -> dict:
    """Score a run or an ensemble folder from its saved files; writes its confusion matrix.

    `tta` applies to a run (None: none); an ensemble uses the TTA it was built with.
    """
    path = Path(path)
    if is_ensemble(path):
        own_tta(path, read(path), tta)
        logp, targets, info = evaluate_ensemble(path, data_spec, split, quiet)
        names, spec, notes = info["class_names"], data.canonical(data_spec or info["data"]), []
    else:
        meta = checkpoint.read_meta(path)
        spec = data.canonical(data_spec or meta["data"])
        ds = data.load(spec, meta.get("val_fraction", 0.1), meta.get("limit"))
        model = evaluate.load_run_model(path, meta)
        tta = tta or "none"
        logp = evaluate.predict_split(model, meta, ds, split, f"run {path}", quiet, tta)
        targets, names = ds.splits[split].labels, ds.names
        notes = data_notes(meta, ds)
    result = evaluate.metrics(logp, targets)
    figure = path / ("confusion.png" if split == "test" else f"confusion-{split}.png")
    matrix = evaluate.confusion(logp.argmax(1), targets, len(names))
    plots.confusion(
        matrix, names, figure, f"{path.name} on {spec} [{split}]: top-1 {result['top1']:.2%}"
    )
    return {"metrics": result, "data": spec, "confusion": str(figure), "notes": notes}


def own_tta(path: Path, info: dict, tta: str | None) -> str:
    """An ensemble predicts with the TTA it was built with (its combiner was fitted on those
    views); asking for another is refused, not silently honoured or ignored."""
    built = info.get("tta", "none")
    if tta is not None:
        evaluate.check_tta(tta)
        if tta != built:
            raise UserError(
                f"--tta {tta} does not apply to ensemble {path}: it was built (and fitted) with "
                f"--tta {built}; build another ensemble for another TTA"
            )
    return built


def data_notes(meta: dict, ds: data.Dataset) -> list[str]:
    """What a user should know when a run is scored on other data than it was trained on."""
    trained = data.canonical(meta["data"])
    if trained != ds.spec:
        return [f"scored on {ds.spec}; the run was trained on {trained}"]
    recorded = meta.get("data_fingerprint")
    if recorded and recorded != ds.fingerprint:
        return [
            f"the files of {ds.spec} changed since the run was trained (fingerprint {recorded} "
            f"then, {ds.fingerprint} now): its val/test splits may hold other images"
        ]
    return []
