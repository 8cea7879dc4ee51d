"""Cross-validation folds over train+val: fixed (seeded by data.SPLIT_SEED, never by a run's
seed), stratified where they can be, shared by every member of a `transferlab auto` study and
by `--fold i/k` runs."""

from __future__ import annotations

import numpy as np

from . import data
from .config import UserError
from .data import SPLIT_SEED, Split


def own_val(spec: str) -> bool:
    """Whether the data `spec` names bring a val split of their own (a folder's val/, shards,
    a CSV's split column, a Hub dataset's validation): --val-fraction carves nothing from them
    (it was recorded as the run's, and `evaluate --data` carved by it)."""
    kind, _, arg = str(spec).partition(":")
    return kind in data.SOURCES and "val" in data.SOURCES[kind](arg, [])[2]


def pool(splits: dict[str, Split]) -> Split:
    """train and val as one split (train first): what cross-validation folds."""
    a, b = splits["train"], splits["val"]
    labels = np.concatenate([a.labels, b.labels])
    if a.paths is not None:
        return Split(labels, paths=a.paths + b.paths)
    if a.members is not None:  # val's shard numbers follow train's shards
        moved = b.members + np.array([len(a.shards), 0, 0])
        return Split(labels, members=np.concatenate([a.members, moved]), shards=a.shards + b.shards)
    return Split(labels, arrays=np.concatenate([a.arrays, b.arrays]))


def cv_folds(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """The held-out indices of each of k folds: stratified where every class has k images,
    seeded by SPLIT_SEED (never by a run's seed), so every member of a study shares them."""
    from sklearn.model_selection import KFold, StratifiedKFold

    labels = np.asarray(labels)
    if len(labels) < k:
        raise UserError(f"too few images ({len(labels)}) for {k} cross-validation folds")
    counts = np.bincount(labels)
    stratified = counts[counts > 0].min() >= k
    cv = (StratifiedKFold if stratified else KFold)(k, shuffle=True, random_state=SPLIT_SEED)
    return [np.sort(held) for _, held in cv.split(np.zeros(len(labels)), labels)]


def fold_splits(splits: dict[str, Split], fold: str) -> dict[str, Split]:
    """Fold i of k of train+val as val, the rest as train (see `load`)."""
    i, k = (int(x) for x in fold.split("/"))
    everything = pool(splits)
    held = cv_folds(everything.labels, k)[i - 1]
    rest = np.setdiff1d(np.arange(len(everything)), held)
    return {
        "train": everything.subset(rest),
        "val": everything.subset(held),
        "test": splits["test"],
    }


def carving(meta: dict) -> tuple:
    """How a run split its data: (val fraction, limit, fold)."""
    fold = (meta.get("config") or {}).get("fold") or "none"
    return meta.get("val_fraction", 0.1), meta.get("limit"), fold


def carving_on(meta: dict, spec: str | None = None) -> tuple:
    """How a run splits `spec` (its own data if None): its carving; a fold belongs to its own
    data only."""
    val_fraction, limit, fold = carving(meta)
    own = spec is None or data.canonical(spec) == data.canonical(meta["data"])
    if str(spec or meta["data"]).startswith("wds:"):  # shards hold their val: a --val-fraction
        val_fraction = None  # given is unused (two runs were said to split them otherwise)
    return val_fraction, limit, fold if own else "none"


def load_as_run(meta: dict, spec: str | None = None, scored: bool = False) -> data.Dataset:
    """A run's data split as it split them (its val carve, limit and `--fold`), or the data
    `spec` split by its val fraction and limit. `scored` by a command that takes --data: its
    own data gone, it is told how to score the run where they lie now (pass 62: it was not)."""
    try:
        return data.load(meta["data"] if spec is None else spec, *carving_on(meta, spec), scoring=spec is not None)  # fmt: skip
    except UserError as err:
        here = spec is None or data.canonical(spec) == data.canonical(meta["data"])
        if not (scored and here and str(err).startswith(("dataset path does not exist", "CSV file not found"))):  # fmt: skip
            raise
        kind = str(meta["data"]).partition(":")[0]
        raise UserError(f"{err}, where the run was trained: if the data moved, give --data {kind}:WHERE_THEY_ARE_NOW") from None  # fmt: skip
