"""Which scored images a run has seen: a run scored on other data than its own, a fine-tune
whose parent (or its parent...) trained on its test images, an ensemble member or a soup
ingredient that did. Counted by file (links and hard links too) and by content (a copy), so
that a score that is not a held-out score says so, where it is printed and where it is kept
(meta.json and ensemble.json `notes`, `evaluate --json`, report.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from . import checkpoint, data
from .config import UserError
from .folds import load_as_run


def data_notes(meta: dict, ds: data.Dataset, split: str = "test") -> list[str]:
    """What a user should know when a run is scored on other data than it was trained on."""
    trained = data.canonical(meta["data"])
    if trained != ds.spec:
        n = trained_on(meta, ds, split)
        return [f"scored on {ds.spec}; the run was trained on {trained}"
                + (f": {n} of the {len(ds.splits[split])} {split} images were among its training "
                   f"or validation images, so this is not a held-out {split} score" if n else "")] + fewer_classes(meta, ds) + part_notes(ds, split)  # fmt: skip
    notes = [note] if (note := inherited_note(meta, ds, split)) else []
    return notes + own_copies(ds, split) + changed_notes([("the run", meta)], ds) + part_notes(ds, split)  # fmt: skip


def fewer_classes(meta: dict, ds: data.Dataset) -> list[str]:
    """The note of a score on data with fewer classes than the run predicts: its predictions
    are restricted to those (its 60% was 0% as predict answers: the run's other classes were
    dropped from the softmax without a word)."""
    k, n = meta["num_classes"], len(ds.classes)
    if n >= k:
        return []
    return [f"scored over the {n} of the run's {k} classes that {ds.spec} holds: its predictions "
            f"are restricted to them (its other classes are never predicted here, as predict "
            f"and serve may), so the score reads higher than on images of all {k}"]  # fmt: skip


CHANGED = "changed since"  # changed_notes'


def changed_notes(named: list[tuple[str, dict]], ds: data.Dataset) -> list[str]:
    """The note of runs trained on `ds`'s spec when its files were others (images added,
    say): its val/test splits are carved again and may hold images they trained on, which
    cannot be counted (the files then are not recorded, only their fingerprint)."""
    changed = [(os.path.basename(os.path.normpath(who)), m["data_fingerprint"]) for who, m in named
               if data.canonical(m["data"]) == ds.spec
               and m.get("data_fingerprint") not in (None, ds.fingerprint)]  # fmt: skip
    if not changed:
        return []
    who = ", ".join(w for w, _ in changed[:3]) + (
        f" and {len(changed) - 3} more" * (len(changed) > 3)
    )
    then = ", ".join(sorted({f for _, f in changed}))
    return [f"the files of {ds.spec} {CHANGED} {who} {'was' if len(changed) == 1 else 'were'} "
            f"trained (fingerprint {then} then, {ds.fingerprint} now): its val/test splits may "
            "hold other images, some of them trained on"]  # fmt: skip


PART = "test score on "  # a test score without the unreadable images --skip-bad-images left out


def part_notes(ds: data.Dataset, split: str = "test") -> list[str]:
    """The notes of a test score on part of the split as `ds` was loaded (--limit): recorded and
    said by every score of it (evaluate, a soup's and an ensemble's said nothing)."""
    return [n for n in ds.notes if n.startswith(PART)] if split == "test" else []


def part_of_test_notes(n: int, of: int) -> list[str]:
    """The note of a test score on `n` of the split's `of` images; [] when on all of them."""
    left = f"{of - n} unreadable left out (--skip-bad-images)"
    return [f"{PART}{n} of the {of} test images: {left}"] if n < of else []


def score_marks(notes: list[str]) -> str:
    """The report's marks of those notes, `own_copies`' and `changed_notes`' (" (test score on
    16 of the 17 test images)", " (11 of the 2985 test images are byte copies of ...)"), or ""."""
    return "".join(f" ({s})" for s in score_notes(notes))


def score_notes(notes: list[str]) -> list[str]:
    """`score_marks`' words, one per mark (results.csv's notes column)."""
    said = [n.split(":")[0] for n in notes if n.startswith(PART) or COPIES in n]
    return said + ["its data's files changed since training"] * any(f" {CHANGED} " in n for n in notes)  # fmt: skip


COPIES = " are byte copies of training images of the same data"  # own_copies' notes


def own_copies(ds: data.Dataset, split: str = "test") -> list[str]:
    """The note of a `split` holding the data's own training images again (train, and val
    for test): the same file through a link, or a copy (the same bytes) made by hand or by a
    scraper; [] if none (data without files: none counted)."""
    if ds.spec.startswith("wds:"):
        from .shards import recorded_copies

        return recorded_copies(ds.spec, split, len(ds.splits[split]))
    scored, others = ds.splits[split].paths, [s for s in ("train", "val") if s != split]
    seen = {p for s in others for p in ds.splits[s].paths or ()}
    if not (n := _among(seen, scored) if scored and seen else 0):
        return []
    return [f"{n} of the {len(scored)} {split} images{COPIES}: each the same file or bytes as "
            f"one of its {'/'.join(others)} images; its {split} score counts them"]  # fmt: skip


def new_run_notes(source: dict, ds: data.Dataset) -> list[str]:
    """A new run's notes on its test split: what the runs its weights came from (`source`)
    trained on, and its own training images again."""
    inherited = [note] if (note := inherited_note({"source": source}, ds)) else []
    return inherited + own_copies(ds)


INHERITED = "images of the run its weights came from"  # inherited_note's (and older notes')


def inherited_note(meta: dict, ds: data.Dataset, split: str = "test") -> str:
    """What a run's `split` of its own data holds of the images the runs its weights came from
    (a fine-tune's parent, a soup's ingredients, theirs) trained on; "" if none."""
    n, names, gone = inherited(meta, ds, split)
    if not n:
        return ""
    how = f" (counted when it trained: {', '.join(gone)} can no longer be read)" if gone else ""
    used = "training" if split == "val" else "training or validation"  # (`inherited`'s: pass 64)
    return (f"{n} of the {len(ds.splits[split])} {split} images were {used} {INHERITED} ({names}), so "
            f"this is not a held-out {split} score{how}")  # fmt: skip


def inherited(meta: dict, ds: data.Dataset, split: str = "test") -> tuple[int, str, list[str]]:
    """How many of `ds`'s `split` images the runs a run's weights came from trained on, their
    names, and those that can no longer be read (moved, deleted, or recorded as typed from
    another folder: the count recorded when it trained, on its own test split, stands in for
    them; it was silently none)."""
    gone: list[str] = []
    found = ancestors(meta, gone)  # (their val, on val: the same carve, chosen on, not trained
    n = count(found, ds, split, ("train",) if split == "val" else ("train", "val"))  # on)
    if gone and split == "test" and meta.get("data") and data.canonical(meta["data"]) == ds.spec:  # fmt: skip
        recorded = [int(m[1]) for note in meta.get("notes", []) if INHERITED in note
                    and (m := re.match(r"(\d+) of the ", note))]  # fmt: skip
        n = max([n, *recorded])
    names = [os.path.basename(os.path.normpath(m["_path"])) for m in found]
    return n, ", ".join(names + [os.path.basename(os.path.normpath(g)) for g in gone]), gone


def ancestors(meta: dict, gone: list[str] | None = None) -> list[dict]:
    """The metas of the runs a run's weights came from (a fine-tune's parent, a soup's
    ingredients, theirs...), nearest first, as far as they can still be read; each with its
    folder as "_path" (those that cannot: added to `gone`)."""
    found, todo, visited = [], [meta.get("source") or {}], set()
    while todo and len(found) < 64:
        source = todo.pop(0)
        if source.get("weights") in ("run", "file"):  # a file: when it is a run's weights
            paths = [source["parent"]] if source.get("parent") else []
        else:
            paths = source.get("ingredients") or [] if source.get("weights") == "soup" else []
        for path in (p for p in paths if isinstance(p, str) and p not in visited):
            visited.add(path)
            try:
                parent = checkpoint.read_meta(path) | {"_path": path}
            except UserError:  # moved or gone: unmeasured (said by `inherited`)
                if gone is not None:
                    gone.append(path)
                continue
            found.append(parent)
            todo.append(parent.get("source") or {})
    return found


def lineage(runs: list[str | Path]) -> list[str]:
    """`runs` and the runs their weights came from (`ancestors`): what a command reads to count
    its leaks, so never its --out (a soup --overwrite over its ingredients' parent replaced it)."""
    found = []
    for run in (Path(r).expanduser() for r in runs):  # (a weights file: the run it lies in)
        run = run.parent if run.is_file() and checkpoint.is_run(run.parent) else run
        with contextlib.suppress(UserError, OSError):  # (not a run: the command says so itself)
            found += [str(run), *(a["_path"] for a in ancestors(checkpoint.read_meta(run)))]
    return found


def trained_on(meta: dict, ds: data.Dataset, split: str = "test") -> int:
    """How many of `ds`'s `split` images a run trained on other data, or the runs its weights
    came from, trained on."""
    return count([meta, *ancestors(meta)], ds, split)


def count(metas: list[dict], ds: data.Dataset, split: str, used=("train", "val")) -> int:
    """How many of `ds`'s `split` images were images of these runs' `used` splits (train and
    val: what they fitted or chose on): the same file (through links, hard links too) or a
    copy of one (the same bytes); data without files (digits) count none."""
    scored = _scored_paths(ds, split)
    if not scored or not metas:
        return 0
    return _among(set().union(*(_seen(m, used) for m in metas)), scored)


def _scored_paths(ds: data.Dataset, split: str) -> list[str] | None:
    """The files of `ds`'s `split`; shards: the files that split was made from, as `data
    shard` split their source (None where unknown: shards made before they recorded their
    --val-fraction, a source without files, or one whose files changed since)."""
    if ds.splits[split].paths is not None or not ds.spec.startswith("wds:"):
        return ds.splits[split].paths
    try:
        index, origin = _sharded_from(ds.spec)
    except (UserError, OSError, ValueError, KeyError, TypeError):  # (None: a source without files)
        return None
    return origin.splits[split].paths if origin.fingerprint == index["fingerprint"] else None


def _sharded_from(spec: str) -> tuple[dict, data.Dataset] | None:
    """A wds: spec's shards.json and the data they were made from, split as `data shard` split
    it; None where that data has no files."""
    index = json.loads((Path(spec[4:]).expanduser() / "shards.json").read_text())
    if index["source"].partition(":")[0] not in FILES:
        return None
    return index, data.load(index["source"], index["val_fraction"])


def _among(seen: set[str], scored: list[str]) -> int:
    """How many `scored` files are among the `seen` ones, by file or by content."""
    stats = {p: _stat(p) for p in {*seen, *scored}}  # one stat a file: identity and size
    ids = {_file_id(p, stats[p]) for p in seen}
    left = [p for p in scored if _file_id(p, stats[p]) not in ids]
    by_size: dict[int, list[str]] = {}
    for p in (p for p in seen if stats[p] and stats[p].st_size):  # copies: the bytes compared
        # where sizes agree (empty files: no image, unreadable, not copies of one another)
        by_size.setdefault(stats[p].st_size, []).append(p)
    sizes = {stats[p].st_size for p in left if stats[p]} & set(by_size)
    digests = {_digest(p) for n in sizes for p in by_size[n]}
    copies = [p for p in left if stats[p] and stats[p].st_size in sizes and _digest(p) in digests]  # fmt: skip
    same = [p for p in scored if _file_id(p, stats[p]) in ids]
    return sum(map(_readable, same + copies))  # (pass 57: a junk file's copies, never scored)


def _readable(path: str) -> bool:
    """Whether Pillow reads the image: an unreadable copy is in no score (refused, or left out
    by --skip-bad-images), so not counted in one. Only copies are read: they are few."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # (every way a file is not an image)
        return False
    return True


FILES = (*data.PATH_KINDS, "hf")  # the data whose images are files: hf:'s rows written out


def _seen(meta: dict, used: tuple[str, ...]) -> set[str]:
    """The files of a run's `used` splits (none where its data have no files or are gone: the
    notes name them, unmeasured). A run on shards: the files they were made from (all but the
    test split's: a carving of train+val unknown here, so train alone is unmeasured; so is
    anything under --limit). A run on hf: data: its rows' images as written out (pass 63: never
    compared, so a score on its own training images read as held out)."""
    if meta["data"].partition(":")[0] not in FILES:
        return set()
    try:
        own = load_as_run(meta)
        if own.spec.startswith("wds:"):
            if meta.get("limit") or set(used) != {"train", "val"}:
                return set()
            own = _sharded_from(own.spec)[1]  # (None: a source without files)
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return set()
    return {p for s in used for p in getattr(own.splits.get(s), "paths", None) or []}


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _file_id(path: str, st: os.stat_result | None) -> tuple[int, int] | str:
    """One file however it is reached (a link, a hard link): its device and inode."""
    return (st.st_dev, st.st_ino) if st else path


def _digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return path
