"""The ensemble folder: build one from finished runs (whatever their architecture, input size
or channels), read it back, score it. Members are in `members`, the combiners in `combiners`.

Folder: ensemble.json (members with their weights' sha256, method, what fitted the combiner,
metrics), combiner.npz (its fitted parameters), logits/<split>.npz, confusion.png.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint, data, decoding, evaluate, outputs, plots
from .combiners import COMBINERS, FITTED, accounting, combine, fit
from .config import UserError
from .folds import load_as_run
from .members import (
    SPLITS,
    VAL_SEEN,
    check_members,
    member_logp,
    note_copies,
    split_apart,
    val_used,
)
from .stops import later

ENSEMBLE = "ensemble.json"
PARAMS = "combiner.npz"  # the fitted combiner (weights; the stacker's coefficients)


def build(
    runs: list[str],
    method: str,
    out: str | Path,
    data_spec: str | None = None,
    quiet: bool = False,
    tta: str = "none",
    overwrite: bool = False,
    fitted: tuple[dict, str] | None = None,
) -> dict:
    """Combine runs with `method`, fit what needs fitting on val, write the ensemble folder.

    `tta`: each member averages its predictions (or, for fusion, its features) over views.
    An existing ensemble folder `out` is replaced only with `overwrite`. `fitted`: the
    combiner's parameters fitted elsewhere, and how (`transferlab auto`: on out-of-fold
    predictions over train+val), used as they are.
    """
    if method not in COMBINERS:
        raise UserError(f"unknown ensemble method '{method}' (known: {', '.join(COMBINERS)})")
    if len(runs) < 2:
        for run in runs:  # (an ensemble given alone: said as that, not "add another run")
            checkpoint.read_meta(run)
        raise UserError("an ensemble needs at least two runs")
    if len({Path(r).resolve() for r in runs}) < len(runs):  # (a link to one counts as it)
        raise UserError("a run is listed twice among the ensemble's members; list each once")
    evaluate.check_tta(tta)  # each member's input size is checked when it predicts
    t0 = time.time()
    runs = [str(r) for r in runs]
    metas = [checkpoint.read_meta(run) for run in runs]  # each a finished run, named if not
    scored = load_as_run(metas[0], data.canonical(data_spec or metas[0]["data"]), scored=True)
    apart = split_apart(runs, metas, data_spec, scored)
    if apart and method in FITTED and not fitted:
        raise UserError(
            f"{apart}: {method} is fitted on {COMBINERS[method].fitted_on} split as the first "
            "member splits it, which holds images a member (or a run it came from) trained on; "
            "combine them with "
            "soft, logit or hard, or train the members with the same --val-fraction, --limit "
            "and --fold"
        )
    decoding.check_cache(None)  # $TRANSFERLAB_CACHE, before the folder is claimed
    outputs.refuse_overlap(out, runs, "member")  # nor into the data it is scored on:
    outputs.refuse_writing_into_data(scored, out)
    outputs.check_out(Path(out), "ensemble", overwrite=overwrite)
    val_seen = [f"{apart}: {VAL_SEEN}"] if apart else []  # recorded: evaluate, report say it
    if val_seen and not fitted:  # (auto fits on out-of-fold predictions, and says so)
        print(f"note: {val_seen[0]}", file=sys.stderr)
    note_copies(runs, metas)  # notes after every refusal: an error stays one line
    on_features = COMBINERS[method].inputs == "features"
    splits = ("train", *SPLITS) if on_features else SPLITS
    notes: list[str] = []  # recorded in ensemble.json: report marks its score
    logp, targets, metas, spec, feats = member_logp(
        runs, data_spec, quiet, tta, splits, on_features, notes, scored
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if on_features:  # fusion: fitted on train features, its strength chosen on val
        log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
        uniform = np.full(len(runs), 1.0 / len(runs))
        params = {"weights": uniform, **COMBINERS[method].fit(feats, targets, log)}
    else:
        params = fitted[0] if fitted else fit(method, logp["val"], targets["val"], "val")
    fitted_on = COMBINERS[method].fitted_on
    how = ("cv", fitted[1]) if fitted else (fitted_on, COMBINED_HOW.get(fitted_on, f"{method} fitted on {fitted_on}"))  # fmt: skip
    out = Path(out)
    with outputs.lock(out):
        outputs.claim(out, "ensemble", outputs.check_out(out, "ensemble", overwrite=overwrite))
        kept = {"data_fingerprint": scored.fingerprint}  # (report: have its files changed since?)
        kept |= {"notes": notes + val_seen} if notes or val_seen else {}  # (the scores they mark)
        return _write(out, method, runs, metas, spec, params, logp, targets, feats, tta, t0, how, kept)  # fmt: skip


def _write(
    out: Path, method, runs, metas, spec, params, logp, targets, feats, tta, t0, how, kept: dict
) -> dict:
    """The ensemble folder: combiner.npz, logits/, ensemble.json (last: marks it complete),
    with `kept` (the data's fingerprint, notes on its scores) too."""
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
                "run": os.path.relpath(Path(run).resolve(), out.resolve()),  # moves with it
                "run_at_build": str(Path(run).resolve()),
                "weights_sha256": meta.get("weights_sha256"),
                "data_fingerprint": meta.get("data_fingerprint"),
                "arch": meta["arch"],
                "input_size": meta["preprocessing"]["input_size"],
                "channels": meta["preprocessing"]["channels"],
                "weight": float(params["weights"][i]),
                "test": evaluate.metrics(logp["test"][i], targets["test"]),
            }
        )
    info = {
        "format": 1,
        "method": method,
        "members": members,
        "fitted_on": how[0],
        "tta": tta,
        "splits": {
            "members": "trained on train; best epoch chosen on val",
            "combiner": how[1],
            "scored": "test",
        },
        "data": spec,
        "classes": metas[0]["classes"],
        "class_names": metas[0]["class_names"],
        "metrics": results,
        **accounting(logp["test"], combined["test"], targets["test"]),
        "seconds": round(time.time() - t0, 2),
        **kept,
    }
    checkpoint.write_json(out / ENSEMBLE, info)
    return info


COMBINED_HOW = {
    None: "nothing fitted",
    "train": "fusion head fitted on train features, its L2 strength chosen on val",
}


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE).is_file()


def read(path: str | Path, resolve: bool = True) -> dict:
    """ensemble.json, each member's "run" resolved: relative to the ensemble folder (so a tree
    of runs and ensembles can be moved, copied or archived), else where it was at build time.
    `resolve=False`: as recorded (a member may be gone)."""
    file = Path(path) / ENSEMBLE
    try:
        info = _checked(json.loads(file.read_text()), file)
    except (OSError, ValueError) as err:
        raise UserError(
            f"corrupt {file}: not valid JSON ({err})"
            if isinstance(err, ValueError)
            else f"cannot read {file}: {err}"
        ) from None
    for m in info["members"] if not resolve else ():
        m["run"] = m.get("run_at_build", m["run"])
    for m in info["members"] if resolve else ():
        places = [Path(path) / m["run"], Path(m.get("run_at_build", m["run"]))]
        found = next((p for p in places if (p / checkpoint.META).is_file()), None)
        if found is None:
            raise UserError(
                f"member {Path(m['run']).name} of ensemble {path} is not at {places[0]} (beside "
                f"the ensemble) nor at {places[1]} (where it was built); put it back in either"
            )
        if found == places[1]:  # (a copy leaning on its original, unsaid)
            later(f"member {m['run']} of ensemble {path} is not beside it ({places[0]}): using the run it was built from, {found}")  # fmt: skip
        m["run"] = str(found)
    return info


def _checked(info, file: Path) -> dict:
    """ensemble.json as its readers index it, else one line naming what is missing (a hand-edited
    or foreign file was a KeyError in report, evaluate, predict, export and serve)."""
    if not isinstance(info, dict):
        raise UserError(f"corrupt {file}: no JSON object in it (not a finished ensemble's record)")
    members, metrics = info.get("members"), info.get("metrics")
    ok = {
        "method": isinstance(info.get("method"), str) and info["method"] in COMBINERS,
        "data": isinstance(info.get("data"), str),
        "classes": all(isinstance(info.get(k), list) for k in ("classes", "class_names")),
        "members (each with its run and weight)": isinstance(members, list)
        and bool(members)
        and all(isinstance(m, dict) and isinstance(m.get("run"), str) for m in members)
        and all(isinstance(m.get("weight"), int | float) for m in members),
        "metrics (val and test)": isinstance(metrics, dict)
        and all(isinstance(metrics.get(s), dict) for s in SPLITS),
    }
    if wrong := [what for what, good in ok.items() if not good]:
        raise UserError(
            f"corrupt {file}: no valid {', '.join(wrong)} (not a finished ensemble's record; "
            "edited by hand?)"
        )
    return info


def read_params(path: str | Path, info: dict) -> dict:
    file = Path(path) / PARAMS
    if not file.is_file():  # written before combiner.npz existed: weights only
        return {"weights": np.array([m["weight"] for m in info["members"]])}
    with np.load(file, allow_pickle=False) as z:
        return dict(z)


def evaluate_ensemble(
    path: str | Path, data_spec: str | None, split: str, quiet: bool = True, notes=None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Recompute an ensemble's combined log-probs on a split from its members' runs (what a
    user should know of them goes to `notes`)."""
    info = read(path)
    check_members(info, path)
    runs = [m["run"] for m in info["members"]]
    method, tta = info["method"], info.get("tta", "none")
    spec = data_spec or info["data"]
    logp, targets, metas, _, feats = member_logp(
        runs, spec, quiet, tta, (split,), method == "fusion", notes
    )
    if split == "val" and notes is not None and (apart := split_apart(runs, metas, spec)):
        notes.append(f"{apart}: {VAL_SEEN}")
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
    if split not in ("train", "val", "test"):  # (the API's; the CLI's are its choices)
        raise UserError(f"split must be train, val or test, not {split!r}")
    decoding.check_cache(None)
    if is_ensemble(path):
        own_tta(path, read(path), tta)
        notes = []
        logp, targets, info = evaluate_ensemble(path, data_spec, split, quiet, notes)
        names, spec, own = info["class_names"], data.canonical(data_spec or info["data"]), info
    else:
        logp, targets, names, spec, notes = evaluate.score_run(path, data_spec, split, quiet, tta)
        own = checkpoint.read_meta(path)
    result = evaluate.metrics(logp, targets)
    other = "-other-data" if spec != data.canonical(own["data"]) else ""  # (not over its own)
    used = val_used(own)[1] if split == "val" and not other else ""
    if used and not any(used in n for n in notes):  # (the report marks it: said here too)
        notes.append(f"{used}: not a held-out val score")
    figure = path / f"confusion{'' if split == 'test' else '-' + split}{other}.png"
    matrix = evaluate.confusion(logp.argmax(1), targets, len(names))
    try:
        if os.path.lexists(figure) and (figure.is_symlink() or not plots.drawn_here(figure)):
            raise OSError(f"{figure.name} there is not a figure transferlab drew (or one drawn before it marked its figures), and is kept: delete it to have it drawn")  # fmt: skip
        plots.confusion(
            matrix, names, figure, f"{path.name} on {spec} [{split}]: top-1 {result['top1']:.2%}"
        )
    except OSError as err:  # a read-only folder: the score stands (it was lost to a figure)
        notes.append(f"the confusion matrix was not written ({err.strerror or err}: {figure})")
        figure = None
    result |= evaluate.per_class(logp, targets, names)
    return {"metrics": result, "data": spec, "confusion": figure and str(figure), "notes": notes}


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
