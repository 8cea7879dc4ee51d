"""The end of `transferlab auto`: choose the best option on out-of-fold predictions (never on
test), make it DIR/best (a run folder, or an ensemble folder whose combiner was fitted on the
out-of-fold predictions), score test once, and write the leaderboard (report.md, report.html).
"""

from __future__ import annotations

import html
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from . import checkpoint, combiners, data, ensembles, evaluate, folds, leaks, members, outputs
from .autospace import FOLDS, SAFETY, Candidate, reserve
from .config import UserError
from .report import md, md_table

VOTES = ("soft", "logit", "hard")  # nothing fitted: scored on the out-of-fold predictions as is
FITTED = ("select", "weighted")  # fitted: scored in a second level of folds
LARGER = "give a larger --budget"  # (a recipe's auto step says it its own way)


def options(names: list[str], logp: np.ndarray, y: np.ndarray, k: int) -> list[dict]:
    """Every option scored on out-of-fold log-probs `logp` (M, N, K): each candidate alone,
    the votes over all, and the fitted combiners (fitted on k-1 folds of the out-of-fold rows,
    scored on the k-th, so their scores are as honest as the others')."""
    rows = []
    for i, name in enumerate(names):
        weights = np.eye(len(names))[i]
        rows.append({"option": name, "method": "single", "weights": weights, **_score(logp[i], y)})
    for method in VOTES if len(names) > 1 else ():
        weights = np.full(len(names), 1.0 / len(names))
        combined = combiners.combine(method, logp, {"weights": weights})
        rows.append(
            {
                "option": f"{method} vote of all",
                "method": method,
                "weights": weights,
                **_score(combined, y),
            }
        )
    for method in FITTED if len(names) > 1 else ():
        combined = np.zeros(logp.shape[1:])
        for held in folds.cv_folds(y, k):
            rest = np.setdiff1d(np.arange(len(y)), held)
            params = combiners.fit(method, logp[:, rest], y[rest], "out-of-fold")
            combined[held] = combiners.combine(method, logp[:, held], params)
        weights = combiners.fit(method, logp, y, "out-of-fold")["weights"]
        label = "greedy selection (Caruana)" if method == "select" else "NLL-fitted weights"
        if np.count_nonzero(weights) == 1:  # it kept one candidate: say which
            label += f": {names[int(np.argmax(weights))]} alone"
        rows.append({"option": label, "method": method, "weights": weights, **_score(combined, y)})
    return rows


def _score(logp: np.ndarray, y: np.ndarray) -> dict:
    m = evaluate.metrics(logp, y)
    return {"top1": m["top1"], "loss": m["loss"]}


def save_oof(out: Path, name: str, logp: np.ndarray, test_logp: np.ndarray) -> None:
    with checkpoint.atomic_path(out / "oof" / f"{name}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, logp=logp.astype(np.float32), test=test_logp.astype(np.float32))


def load_oof(out: Path, name: str, shape: tuple | None = None) -> np.ndarray | None:
    """A candidate's out-of-fold log-probabilities; None where its file is missing, damaged
    (a copy cut short, a full disk) or not of `shape` (a resume runs that candidate again)."""
    try:
        with np.load(out / "oof" / f"{name}.npz", allow_pickle=False) as z:
            logp = z["logp"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return logp if shape is None or logp.shape == tuple(shape) else None


def finish(out: Path, ds: data.Dataset, cands: list[Candidate], log, quiet: bool, spent: float = 0.0) -> dict:  # fmt: skip
    """Choose (highest out-of-fold top-1, then lowest NLL), build DIR/best, score test once.
    `spent`: the study's seconds so far (with none chosen, the budget that would fit the
    cheapest is said: pass 55 followed "give a larger --budget" with 2m, and it needed 4m)."""
    done = [c for c in cands if c.status == "done"]
    if not done:
        failed = [c for c in cands if c.status == "failed"]
        if failed and all(c.status == "failed" for c in cands):  # not the budget: say why
            raise UserError(f"no candidate finished: {failed[0].name}: {failed[0].why}")
        skipped = [c for c in cands if c.status == "skipped"] or cands
        timed = [c for c in skipped if c.estimate > 0] or skipped  # why: estimate, time left
        cheapest = min(timed, key=lambda c: c.estimate)
        began = "finished" if any(c.status == "stopped" for c in cands) else "fitted"
        need = spent + cheapest.cost() * SAFETY  # and the reserve of the budget that fits it
        need = max(need + reserve(need), need / 0.95)
        fits = bool(spent > 0 and cheapest.status == "skipped" and cheapest.estimate > 0)  # fmt: skip
        fits = f"; a budget of {math.ceil(need / 60)}m would fit it" * fits
        raise UserError(
            f"no candidate {began} within the budget (the cheapest, {cheapest.name}: "
            f"{cheapest.why or cheapest.status}{fits}): {LARGER} (with --resume it "
            f"continues this study in {out}, its timings kept)"
        )
    names = [c.name for c in done]
    logp = np.stack([load_oof(out, n) for n in names])
    y = folds.pool(ds.splits).labels
    rows = options(names, logp, y, FOLDS)
    best = max(rows, key=lambda r: (round(r["top1"], 10), -r["loss"]))
    width = max(32, *(len(r["option"]) for r in rows))
    for r in rows:
        r["chosen"] = r is best
        log(
            f"   {r['option']:<{width}} CV top-1 {r['top1']:.2%}  NLL {r['loss']:.4f}"
            + ("  <- chosen" if r is best else "")
        )
    for c, w in zip(done, best["weights"], strict=True):
        c.why = chosen_why(c.why, w)
    test, scored = _build_best(out, done, best, quiet)
    notes = _notes(out / "best")  # what its test score holds (byte copies of training images)
    return {
        "notes": notes,
        "mark": leaks.score_marks(notes),
        "scored": scored,
        "desc": best["option"],
        "method": best["method"],
        "cv": {k: best[k] for k in ("top1", "loss")},
        "options": [{k: _plain(v) for k, v in r.items()} for r in rows],
        "test": test,
    }


def chosen_why(why: str, weight: float) -> str:
    """A finished candidate's leaderboard line: whether the choice took it, then why it ran as
    it did ("5 of 10 epochs, to fit the time left": a chosen one's was dropped, and a resume's
    choice kept the earlier choice's words)."""
    said = f"in best (weight {weight:.2f})" if weight > 0 else "not chosen"
    own = re.sub(r"^(in best \(weight [\d.]+\)|not chosen)(; )?", "", why or "")
    return f"{said}; {own}" if own else said


def _plain(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


def _build_best(out: Path, done: list[Candidate], best: dict, quiet: bool) -> tuple[dict, str]:
    """DIR/best: the chosen probe's run copied, or an ensemble of the chosen members' runs (a
    trained candidate's k fold runs share its weight); returns its test metrics and when they
    were scored (before, where DIR/best already held this choice: `_kept`)."""
    runs, weights = [], []
    for c, w in zip(done, best["weights"], strict=True):
        if w <= 0:
            continue
        folder = out / "candidates" / c.name
        members = [folder] if c.kind == "probe" else sorted(folder.glob("fold-*"), key=_fold_no)
        runs += members
        weights += [w / len(members)] * len(members)
    dest = out / "best"
    method = "soft" if best["method"] == "single" else best["method"]
    weights = list(np.asarray(weights) / np.sum(weights))
    if (kept := _kept(dest, runs, method, weights)) is not None:
        return kept, "scored before, kept: the same choice as then"
    scored = (
        "scored again: best/ rebuilt for another choice" if dest.exists() else "scored once, now"
    )
    _clear(dest)
    if len(runs) == 1:
        shutil.copytree(runs[0], dest, ignore=shutil.ignore_patterns(".transferlab.lock", "state"))
        return checkpoint.read_meta(dest)["metrics"]["test"], scored
    how = "fitted on out-of-fold predictions over train+val (transferlab auto)"
    params = {"weights": np.asarray(weights)}
    info = ensembles.build([str(r) for r in runs], method, dest, quiet=quiet, fitted=(params, how))
    return info["metrics"]["test"], scored


def _notes(dest: Path) -> list[str]:
    """The notes DIR/best recorded with its test score (as `report` reads them); not those of
    its val scores, which the study's pages do not show (they read as doubts of its CV)."""
    ens = ensembles.is_ensemble(dest)
    notes = (ensembles.read(dest, resolve=False) if ens else checkpoint.read_meta(dest)).get("notes", [])  # fmt: skip
    return [n for n in notes if members.VAL_SEEN not in n and members.SOUP_VAL_SEEN not in n]


def _kept(dest: Path, runs: list[Path], method: str, weights: list[float]) -> dict | None:
    """The test metrics of a DIR/best that already holds this choice, built from these runs'
    weights (a resumed study that chooses as before: test is not scored again); else None."""
    sha = [checkpoint.read_meta(r).get("weights_sha256") for r in runs]
    if len(runs) == 1 and checkpoint.is_run(dest):
        meta = checkpoint.read_meta(dest)
        same = [meta.get("weights_sha256")] == sha
        return meta["metrics"]["test"] if same else None
    if not ensembles.is_ensemble(dest):
        return None
    info = ensembles.read(dest, resolve=False)
    was = [(Path(m["run"]).resolve(), m["weights_sha256"], m["weight"]) for m in info["members"]]
    now = [(Path(r).resolve(), s, w) for r, s, w in zip(runs, sha, weights, strict=True)]
    same = (
        info["method"] == method
        and len(was) == len(now)
        and all(a[:2] == b[:2] and abs(a[2] - b[2]) < 1e-6 for a, b in zip(was, now, strict=False))
    )
    return info["metrics"]["test"] if same else None


REBUILT = "a study rebuilds best/ from its candidates when it ends"


def _clear(dest: Path) -> None:
    """Remove a previous DIR/best (a resumed study rebuilds it), only if transferlab wrote all
    of it (`outputs.check_rebuildable`, which `auto.run` also checks before any work)."""
    outputs.check_rebuildable(dest, REBUILT)
    if dest.exists():
        shutil.rmtree(dest)


def _fold_no(path: Path) -> int:
    return int(path.name.split("-")[1])


def write_report(
    out: Path, ds, cands: list[Candidate], result: dict, budget: float, spent: float
) -> None:
    """report.md and report.html: the leaderboard of every candidate and option."""
    head = [
        "candidate",
        "kind",
        "model",
        "input",
        "CV top-1",
        "CV NLL",
        "estimate s",
        "seconds",
        "status",
        "why",
    ]
    rows = [
        [
            c.name,
            c.kind,
            c.settings["model"],
            f"{c.settings['input_size']}px",
            f"{c.cv['top1']:.2%}" if c.cv else "",
            f"{c.cv['loss']:.4f}" if c.cv else "",
            f"{c.estimate:.0f}" if c.estimate else "",  # (not timed)
            f"{c.seconds:.0f}",
            c.status,
            c.why,
        ]
        for c in sorted(cands, key=lambda c: -(c.cv or {}).get("top1", -1))
    ]
    opts = [
        [o["option"], f"{o['top1']:.2%}", f"{o['loss']:.4f}", "chosen" if o["chosen"] else ""]
        for o in result["options"]
    ]
    t = result["test"]
    summary = (
        f"Data {ds.spec}: {len(ds.classes)} classes. Budget {budget / 60:.1f} min, used "
        f"{spent / 60:.1f} min. Every score below is cross-validated ({len(folds.pool(ds.splits))} "
        f"train+val images, out-of-fold); test ({len(ds.splits['test'])} images) was scored "
        f"once, by the chosen option: top-1 {t['top1']:.2%}{result.get('mark', '')}, "
        f"{evaluate.top5_text(t, 'top-5 {:.2%}, ')}NLL {t['loss']:.4f}. DIR/best: {result['desc']}."
    ) + "".join(f" Note: {n}." for n in result.get("notes", []))
    text = [
        "# transferlab report: auto",
        "",
        md(summary),
        "",
        md_table(head, rows),
        "",
        md_table(["option", "CV top-1", "CV NLL", ""], opts),
    ]
    outputs.write_report_file(out / "report.md", "\n".join(text) + "\n")  # (a user's edit: refused
    # before the study began, auto.run)
    body = (
        f"<h1>transferlab report: auto</h1><p>{html.escape(summary)}</p><h2>Candidates</h2>"
        f"{_html(head, rows)}<h2>Options (how the candidates combine)</h2>"
        f"{_html(['option', 'CV top-1', 'CV NLL', ''], opts)}"
    )
    style = (
        "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
    )
    page = f"<!doctype html>\n<html><head><meta charset=utf-8><title>transferlab report: auto</title><style>{style}</style></head><body>{body}</body></html>\n"
    outputs.write_report_file(out / "report.html", page)


def _html(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"
