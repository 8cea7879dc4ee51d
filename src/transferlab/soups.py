"""Model soups (Wortsman et al. 2022): average the weights of runs fine-tuned from one start.

Averaging only makes sense for runs that share the architecture and the very weights they
started from (pretrained backbone and head initialisation): every run records a fingerprint of
its initial state in meta.json (source.init_sha256), and anything else is refused with the
reason. `uniform` averages every run; `greedy` adds runs in order of their val top-1 and keeps
each one only if the soup's val top-1 does not drop. BatchNorm statistics of an average are
not the average of statistics: they are recomputed on the training images after averaging
(unless every run holds the same ones: a frozen backbone's, as linear probes do).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import batching, checkpoint, data, decoding, evaluate, leaks, members, models, outputs
from .config import UnreadableImages, UserError
from .folds import load_as_run

METHODS = ("uniform", "greedy")


def check_lineage(runs: list[str], metas: list[dict]) -> None:
    """Refuse runs that do not share architecture, classes, preprocessing and initial weights."""
    if len(runs) < 2:
        raise UserError("a soup needs at least two runs")
    ref = metas[0]
    for run, meta in zip(runs[1:], metas[1:], strict=True):
        for what, of in (
            ("architectures", models.Architecture.of_run),
            ("classes", lambda m: m["classes"]),
            ("preprocessing", lambda m: models.Preprocessing.from_dict(m["preprocessing"])),
        ):
            if of(meta) != of(ref):
                raise UserError(
                    f"cannot soup {run} with {runs[0]}: different {what} "
                    "(a soup averages the weights of one architecture fine-tuned from one start)"
                )
    inits = [m["source"].get("init_sha256") for m in metas]
    if None in inits:
        raise UserError(
            f"cannot soup {runs[inits.index(None)]}: its meta.json records no initial weights "
            "(source.init_sha256; runs trained before transferlab recorded lineage)"
        )
    if len(set(inits)) > 1:
        i = next(i for i, h in enumerate(inits) if h != inits[0])
        kin = [(a, b) for a, b, m in ((runs[0], runs[i], metas[i]), (runs[i], runs[0], metas[0]))
               if Path(a).resolve() in {Path(x["_path"]).resolve() for x in leaks.ancestors(m)}]  # fmt: skip
        why = f"{kin[0][1]} was fine-tuned from {kin[0][0]}: soup its fine-tunes with one another" if kin else "another seed's head, other pretrained weights or another parent run"  # fmt: skip
        raise UserError(f"cannot soup {runs[i]} with {runs[0]}: they started from different weights ({why}); ensemble them instead")  # fmt: skip


def average(states: list[dict]) -> dict:
    """The mean of floating-point tensors; integer buffers (BN batch counts) from the first."""
    out = {}
    for name, t in states[0].items():
        if t.is_floating_point():
            out[name] = sum(s[name].float() for s in states) / len(states)
            out[name] = out[name].to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def same_statistics(states: list[dict]) -> bool:
    """Every state holds the same BatchNorm statistics: a frozen backbone's (linear probes, or
    runs that froze it). Their average is then exact; recomputed, the features a probe's head
    was fitted on moved (two identical probes souped: test 100% -> 62.5%)."""
    keys = [k for k in states[0] if k.endswith(("running_mean", "running_var"))]
    return all(torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys)


def recompute_batchnorm(
    model: nn.Module, images: np.ndarray, prep: models.Preprocessing, batch_size: int
) -> bool:
    """Re-estimate BatchNorm running statistics on images (torch's `update_bn`: reset, then a
    cumulative average over batches). Returns whether the model has BatchNorm at all."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    dev = evaluate.device()
    batches = (
        batching.normalize(
            torch.from_numpy(np.array(images[i : i + batch_size])).to(dev),
            prep.mean,
            prep.std,
        )
        for i in range(0, len(images), batch_size)
    )
    torch.optim.swa_utils.update_bn(batches, model)
    model.eval()
    return True


def make(
    runs: list[str | Path],
    method: str,
    out: str | Path,
    data_spec: str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict:
    """Average runs' weights into a new run folder `out`, scored like any run (a run or soup
    there is replaced, once every check has passed, only with `overwrite`)."""
    if method not in METHODS:
        raise UserError(f"unknown soup method '{method}' (known: {', '.join(METHODS)})")
    t0 = time.time()
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    runs = [str(r) for r in runs]
    metas = [checkpoint.read_meta(r) for r in runs]
    if len({str(Path(r).resolve()) for r in runs}) < len(runs):
        raise UserError("a run is listed twice among the soup's ingredients; list each once")
    outputs.refuse_overlap(out, runs, "ingredient run")
    outputs.refuse_overlap(out, leaks.lineage(runs), "an ancestor of the ingredients,")
    if (Path(out) / checkpoint.META).exists() and not overwrite:  # (then: --overwrite helps)
        raise UserError(f"{out} already holds a run: pass --overwrite to replace it, or choose another --out")  # fmt: skip
    check_lineage(runs, metas)
    ds = load_as_run(metas[0], data.canonical(data_spec or metas[0]["data"]), scored=True)
    _check_classes(metas[0], ds, runs[0])  # before the folder is claimed
    if (apart := members.split_apart(runs, metas, data_spec)) and method != "uniform":
        raise UserError(
            f"{apart}: a {method} soup chooses on the val split as the first run splits it, "
            "which holds images a run (or a run it came from) trained on; make a uniform soup, "
            "or train them "
            "with the same --val-fraction, --limit and --fold"
        )
    val_seen = [f"{apart}: {members.SOUP_VAL_SEEN}"] if apart else []  # recorded: report marks
    outputs.refuse_writing_into_data(ds, out)  # nor into the data it is scored on
    decoding.check_cache(None)
    images = _decoded(ds, metas[0], quiet, val_seen)  # before --out is claimed (pass 53)
    again = overwrite or _stopped(Path(out))  # (a soup stopped before it finished: made again)
    outputs.check_out(Path(out), "run", overwrite=again)
    for note in val_seen:  # (test is held out before val is carved: its score stands)
        print(f"note: {note}", file=sys.stderr)
    members.note_copies(runs, metas, "soup")  # after every refusal: an error stays one line
    with outputs.lock(Path(out)):
        outputs.claim(Path(out), "run", outputs.check_out(Path(out), "run", overwrite=again))
        return _cook(runs, metas, method, Path(out), ds, images, log, t0, val_seen)


def _decoded(ds: data.Dataset, ref: dict, quiet: bool, notes: list[str]) -> dict:
    """The splits at the runs' size; an unreadable image left out, and said in `notes`, where
    the runs left theirs out (--skip-bad-images: the advice was that flag, which soup lacks)."""
    prep, skip = models.Preprocessing.from_dict(ref["preprocessing"]), bool(ref.get("config", {}).get("skip_bad_images"))  # fmt: skip
    images, unread = {}, []
    for s in ("train", "val", "test"):
        try:
            images[s], kept, bad = decoding.decode_checked(ds.splits[s], prep.input_size, prep.channels, prep.interpolation, skip, f"decode {s}", quiet, decoding.resolve_cache(None))  # fmt: skip
        except UnreadableImages as err:
            unread += err.bad
            continue
        if bad:
            notes += leaks.part_of_test_notes(len(kept), len(ds.splits[s])) if s == "test" else []
            notes.append(f"left out {len(bad)} unreadable {s} image(s), as its runs did (--skip-bad-images): " + "; ".join(bad))  # fmt: skip
            ds.splits[s] = kept
    if unread:
        raise UnreadableImages(f"{len(unread)} unreadable image(s) in the data the soup is scored on: fix or remove them (a score counts every image of its split): " + UnreadableImages.some(unread), unread)  # fmt: skip
    return images


def _check_classes(ref: dict, ds: data.Dataset, run: str) -> None:
    """A soup is scored (and a greedy one chosen) on data holding the runs' classes in their
    order: with --data OTHER its labels were compared with the model's outputs by index (a
    soup right on every image recorded 0%; a class the runs lack, a traceback)."""
    cols = evaluate.class_map(ref["classes"], ref["class_names"], ds.classes, ds.names, f"run {run}")  # fmt: skip
    if len(cols) != ref["num_classes"] or list(cols) != list(range(len(cols))):
        raise UserError(
            f"a soup is scored on data with its runs' {ref['num_classes']} classes in their "
            f"order; {ds.spec} holds {len(cols)} of them{' in another order' if len(cols) == ref['num_classes'] else ''}: "
            "make the soup on the runs' own data, then score it there with evaluate --data"
        )  # fmt: skip


def _stopped(out: Path) -> bool:
    """`out` is a transferlab run folder with neither weights' record nor training state: a
    soup (or a run) stopped before it wrote anything to keep ("pass --resume or --overwrite",
    which soup does not take, was the way out)."""
    return (
        bool(outputs.read_mark(out))
        and not (out / checkpoint.META).exists()
        and not (out / "state").exists()
    )


def _greedy(order: list[int], cook, runs, log) -> list[int]:
    """Add runs best-val-first while the soup's val top-1 does not drop (Wortsman et al.)."""
    kept, best = [order[0]], cook([order[0]])
    for i in order[1:]:
        val = cook([*kept, i])
        accept = val["top1"] >= best["top1"]
        log(f"   greedy soup: + {Path(runs[i]).name}: val {val['top1']:.2%} "
            f"({'kept' if accept else 'left out'})")  # fmt: skip
        if accept:
            kept, best = [*kept, i], val
    return kept


def _cook(runs, metas, method, out: Path, ds: data.Dataset, images, log, t0, val_seen) -> dict:
    """make() once the output folder is validated, claimed and locked; `ds` as the first
    run splits the data it is scored on, `images` its splits decoded; `val_seen`: the notes of
    a val ingredients trained on, and of images left out."""
    states = [checkpoint.load_run_weights(r, m) for r, m in zip(runs, metas, strict=True)]
    ref, prep = metas[0], models.Preprocessing.from_dict(metas[0]["preprocessing"])
    spec = ds.spec
    model = models.for_run(ref).to(evaluate.device())
    batch = ref.get("eval_batch_size", 256)
    precision = evaluate.inference_precision(ref.get("precision", "fp32"))

    def cook(members: list[int]) -> dict:
        model.load_state_dict(average([states[i] for i in members]))
        if not same_statistics([states[i] for i in members]):  # probes: their own, exact
            recompute_batchnorm(model, images["train"], prep, batch)
        logits = evaluate.predict(
            evaluate.frozen(model, prep), images["val"], prep, precision, batch
        )
        return evaluate.metrics(logits, ds.splits["val"].labels)

    order = sorted(range(len(runs)), key=lambda i: -metas[i]["metrics"]["val"]["top1"])
    kept = order if method == "uniform" else _greedy(order, cook, runs, log)
    cook(kept)
    scored = evaluate.frozen(model, prep)  # as evaluate scores the soup
    logits = {
        s: evaluate.predict(scored, images[s], prep, precision, batch) for s in ("val", "test")
    }
    metrics = {s: evaluate.metrics(logits[s], ds.splits[s].labels) for s in logits}
    out = Path(out)
    arch, classes = ref["arch"], ref["classes"]
    checkpoint.save_weights(out, model, arch, classes)
    for split, values in logits.items():
        checkpoint.save_logits(out, split, values, ds.splits[split].labels)
    shared = same_statistics([states[i] for i in kept])  # (BatchNorm: kept, not recomputed)
    source = {
        "weights": "soup",
        "method": method,
        "ingredients": [str(Path(runs[i]).resolve()) for i in kept],
        "candidates": [str(Path(r).resolve()) for r in runs],
        "candidates_sha256": [m.get("weights_sha256") for m in metas],
        "init_sha256": ref["source"]["init_sha256"],
        "seeds": [metas[i].get("seed") for i in kept],  # (its report: each one's, not the first's)
        "lrs": [metas[i].get("config", {}).get("lr") for i in kept],
        "batchnorm": "kept: the same in every ingredient" if shared else "recomputed on train",
    }
    notes = leaks.new_run_notes(source, ds) + leaks.part_notes(ds)  # its ingredients'
    for note in notes:  # training images among its test images
        print(f"note: {note}", file=sys.stderr, flush=True)
    meta = {
        **{k: v for k, v in ref.items() if k not in ("probe", "snapshot", "history", "notes")},
        "seed": None,  # (each ingredient's: source.seeds)
        "source": source,
        "notes": notes + val_seen,
        "data": spec,  # what it was built and scored on (--data), with its fingerprint
        "data_fingerprint": ds.fingerprint,
        "config": {**ref.get("config", {}), "data": spec},
        "strategy": "soup",
        "epochs_run": 0,
        "best_epoch": 0,
        "seconds": round(time.time() - t0, 1),
        "metrics": metrics,
        "weights_sha256": checkpoint.sha256(checkpoint.weights_path(out)),
    }
    checkpoint.write_json(out / checkpoint.META, meta)
    return meta
