"""Ensemble members: finished runs, checked to agree on classes and to be the runs the ensemble
was built from, and their log-probabilities per split (cached logits when their data agree,
else each member predicts the raw images through its own preprocessing)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import checkpoint, data, evaluate, leaks
from .config import UserError, few
from .folds import carving_on, load_as_run

SPLITS = ("val", "test")


def _some(names: list[str]) -> str:
    return few(names) or "none"


def check_classes(metas: list[dict], runs: list[str]) -> list[np.ndarray]:
    """Per member, the column order that aligns its classes with the first member's."""
    ref = metas[0]["classes"]
    orders = []
    for meta, run in zip(metas, runs, strict=True):
        if set(meta["classes"]) != set(ref):
            extra, missing = (sorted(a - b) for a, b in ((set(meta["classes"]), set(ref)), (set(ref), set(meta["classes"]))))  # fmt: skip
            raise UserError(
                f"members have different classes: {run} vs {runs[0]} "
                f"(only in {run}: {_some(extra)}; only in {runs[0]}: {_some(missing)})"
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
    notes: list[str] | None = None,
    ds: data.Dataset | None = None,
) -> tuple[dict, dict, list[dict], str, dict]:
    """Member log-probs per split, aligned to the first member's classes; what a user should
    know of the scores (test images a member trained on) goes to `notes`, else to stderr.

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
    ds = load_as_run(metas[0], spec, scored=True) if ds is None else ds  # (`ds`: loaded)
    changed = leaks.changed_notes(split_alike(runs, metas, spec), ds)
    tested = [leak_note(runs, metas, ds), *leaks.own_copies(ds), *leaks.part_notes(ds)] if "test" in splits else []  # fmt: skip
    tested += evaluate.mirror_notes(tta, runs, metas)
    restricted = leaks.fewer_classes(metas[0], ds)  # columns follow the data's classes
    for said in filter(None, [*tested, *changed, *restricted]):  # (test's: where it is scored)
        if notes is None:  # as evaluate says them of one run, --quiet or not
            print(f"note: {said}", file=sys.stderr)
        else:
            notes.append(said)
    loaded = len(ds.notes)  # a member that skipped bad images when trained skips them here
    listed = {split: len(ds.splits[split]) for split in splits}
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
        model = evaluate.load_run_model(run, meta, scoring=True)  # sha256 verified
        who = f"run {run}"
        evaluate.class_map(meta["classes"], meta["class_names"], ds.classes, ds.names, who)
        val_fraction, limit, fold = carving_on(metas[0], spec)  # how `ds` was split
        key = checkpoint.features_key(spec, val_fraction, limit, tta, fold)
        for split in splits:
            f = checkpoint.load_features(run, f"{split}-{tta}", key)
            if f is None:
                f = evaluate.predict_split(model, meta, ds, split, who, quiet, tta, True)
                checkpoint.save_features(run, f"{split}-{tta}", key, f)
            per_member_feats[split].append(f)
            lg = evaluate.head_logits(model, f)  # the run's own class order
            per_member[split].append(evaluate.log_softmax(lg[:, order]))
    for note in ds.notes[loaded:]:
        print(f"note: {note}", file=sys.stderr)
    if len(targets) < len(splits):  # some member predicted: targets in the first's class order
        first = metas[0]
        to_first = evaluate.class_map(
            first["classes"], first["class_names"], ds.classes, ds.names, f"run {runs[0]}"
        )
        targets = {split: to_first[ds.splits[split].labels] for split in splits}
    if notes is not None and "test" in splits:
        notes += leaks.part_of_test_notes(len(targets["test"]), listed["test"])
    logp = {split: np.stack(per_member[split]) for split in splits}
    feats = (
        {split: np.concatenate(per_member_feats[split], axis=1) for split in splits}
        if features
        else {}
    )
    return logp, targets, metas, spec, feats


def note_copies(runs: list[str], metas: list[dict], what: str = "ensemble") -> None:
    """Members (a soup's ingredients) with the same weights (a copied run folder, a run and
    its last snapshot) count one model twice: said."""
    seen = {}
    for run, meta in zip(runs, metas, strict=True):
        sha = meta.get("weights_sha256")
        if sha and sha in seen:
            print(f"note: {run} has the same weights as {seen[sha]} (a copy?): that model counts "
                  f"twice in the {what}", file=sys.stderr)  # fmt: skip
        seen.setdefault(sha, run)


def leak_note(runs: list[str], metas: list[dict], ds: data.Dataset) -> str:
    """What an ensemble's test score holds of images its members (trained on other data) or
    the runs their weights came from (a fine-tune's parent) trained on; "" if nothing."""
    spec = ds.spec
    others = sorted({data.canonical(m["data"]) for m in metas} - {spec})
    n_test, seen = len(ds.splits["test"]), []
    for run, meta in zip(runs, metas, strict=True):
        if data.canonical(meta["data"]) != spec:
            seen.append((run, leaks.trained_on(meta, ds)))
        elif n := leaks.inherited(meta, ds)[0]:  # (a parent moved: counted when it trained)
            seen.append((f"the runs {run}'s weights came from", n))
    leak = "; ".join(f"{n} of the {n_test} test images trained {r}" for r, n in seen if n)
    why = f"{leak}: the ensemble's test score is not a test score" if leak else ""
    if not others:  # counted, as evaluate counts them for one run: never guessed ("may be")
        return why
    return f"scored on {spec}; member(s) trained on {', '.join(others)}" + (
        f": {why}" if why else ""
    )


VAL_SEEN = "the ensemble's val scores count images a member trained on"
SOUP_VAL_SEEN = "the soup's val score holds images an ingredient trained on"


def val_used(record: dict) -> tuple[str, str]:
    """Why a run's or an ensemble's val score (meta.json, ensemble.json) is no held-out score,
    as the report marks it and `evaluate --split val` says it: members or ingredients trained
    on it (fold runs, runs split otherwise), a greedy soup chose its ingredients by it, a
    combiner was fitted on it or (fusion, fitted on train) its strength chosen on it; ("", "")
    if none of these."""
    notes, src = record.get("notes", []), record.get("source") or {}
    if any(VAL_SEEN in n for n in notes):
        return "members trained on it", VAL_SEEN
    if any(SOUP_VAL_SEEN in n for n in notes):
        return "ingredients trained on it", SOUP_VAL_SEEN
    if src.get("weights") == "soup" and src.get("method") == "greedy":
        return "chosen on it", "the greedy soup chose its ingredients by its val score"
    return {
        "val": ("fitted on it", "the ensemble's combiner was fitted on its val split"),
        "train": ("chosen on it", "the ensemble's combiner strength was chosen on its val split"),
    }.get(record.get("fitted_on"), ("", ""))


def split_apart(
    runs: list[str], metas: list[dict], data_spec: str | None, ds: data.Dataset | None = None
) -> str:
    """Members that split the scored data otherwise than the first member (its val is their
    train), or whose weights came from runs that trained on that val, said in words; "" if
    none."""
    spec = data.canonical(data_spec or metas[0]["data"])
    first = carving_on(metas[0], spec)
    other = [(r, m) for r, m in zip(runs[1:], metas[1:], strict=True)
             if data.canonical(m["data"]) == spec and not _splits_as(metas[0], m, spec)]  # fmt: skip
    parts = []
    if other:
        said = [f"{r} as {_carving_words(carving_on(m, spec))}" for r, m in other[:2]]
        more = f" and {len(other) - 2} more" if len(other) > 2 else ""
        first_words = _carving_words(first)
        parts.append(f"{', '.join(said)}{more} split the data otherwise than {runs[0]} "
                     f"({first_words})")  # fmt: skip
    found = [(r, a) for r, m in zip(runs, metas, strict=True) if (a := leaks.ancestors(m))]
    same = split_alike(runs, metas, spec)
    elsewhere = [
        (r, m) for r, m in zip(runs, metas, strict=True) if data.canonical(m["data"]) != spec
    ]
    if found or elsewhere or any(m.get("data_fingerprint") for _, m in same):
        ds = load_as_run(metas[0], spec) if ds is None else ds  # (`ds`: loaded already)
        parts += [n.split(" (fingerprint")[0] for n in leaks.changed_notes(same, ds)]
        for run, meta in elsewhere:  # trained on other data (shards of its own, say)
            if n := leaks.count([meta], ds, "val", used=("train",)):
                parts.append(f"{n} of the {len(ds.splits['val'])} val images trained {run}")
        for run, came in found:  # a fine-tune whose parent trained on this val (split otherwise)
            if n := leaks.count(came, ds, "val", used=("train",)):  # (its own val: fine)
                parts.append(f"{n} of the {len(ds.splits['val'])} val images trained the runs "
                             f"{run}'s weights came from")  # fmt: skip
    return "; ".join(parts)


def split_alike(runs: list[str], metas: list[dict], spec: str) -> list[tuple[str, dict]]:
    """The members trained on `spec` split as the first member splits it (whose recorded
    fingerprint is that of the data as scored, unless its files changed)."""
    return [(str(r), m) for r, m in zip(runs, metas, strict=True)
            if data.canonical(m["data"]) == spec and _splits_as(metas[0], m, spec)]  # fmt: skip


def _splits_as(first: dict, meta: dict, spec: str) -> bool:
    """Whether a run splits `spec` as the `first` does: by the same carving, or into the same
    splits as recorded (a --val-fraction recorded for data with a val of their own carved
    nothing: "split otherwise", "val holds images a member trained on", said of no image)."""
    same = meta.get("data_fingerprint") and meta["data_fingerprint"] == first.get("data_fingerprint")  # fmt: skip
    return carving_on(meta, spec) == carving_on(first, spec) or bool(same)


def _carving_words(how: tuple) -> str:
    val_fraction, limit, fold = how
    words = [f"--val-fraction {val_fraction:g}"]
    words += [f"--limit {limit}"] if limit else []
    words += [f"--fold {fold}"] if fold != "none" else []
    return " ".join(words)


def same_data(meta: dict, ds: data.Dataset, first: dict) -> bool:
    """A run's cached logits are for `ds`: same spec, split carving and files (fingerprint)."""
    recorded = meta.get("data_fingerprint")  # runs made before fingerprints: trust the spec
    return (
        data.canonical(meta["data"]) == ds.spec
        and carving_on(meta, ds.spec) == carving_on(first, ds.spec)
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
