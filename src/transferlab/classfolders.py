"""The folder: source: a folder of class folders, or train/ with val/ and test/ of class
folders. Skips (and says) hidden folders, transferlab's own output folders and files that are
not images; refuses broken links, folders named outside UTF-8 and classes that differ between
splits."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np

from . import outputs
from .config import UserError
from .data import IMAGE_EXTENSIONS, SPLIT_NAMES, Split


def source(root: str, notes: list[str]):
    """Class folders, or train/ with val/ and test/ of class folders (or SPLIT_NAMES' other
    names: validation/, dev/, eval/), each used as given."""
    root_path = existing_dir(root)
    subdirs = {d.name: d for d in visible_dirs(root_path)}
    named: dict[str, list[Path]] = {}  # split -> its folders (val/ and validation/ both: refused)
    for name, d in subdirs.items():
        if name.lower() in SPLIT_NAMES and visible_dirs(d):  # Train/, Test/ too; a class named dev holds images  # fmt: skip
            named.setdefault(SPLIT_NAMES[name.lower()], []).append(d)
    if not named:  # class folders at the top
        classes = _class_dirs(root_path, notes)
        return classes, classes, {"train": _folder_split(root_path, classes, notes)}, None, 3
    for split, dirs in named.items():
        if len(dirs) > 1:
            raise UserError(f"{root}: both {' and '.join(d.name + '/' for d in dirs)} hold the {split} split; keep one")  # fmt: skip
    if "train" not in named:
        raise UserError(f"{root} has {', '.join(d[0].name + '/' for d in named.values())} but no train/: put the training images in train/<class>/")  # fmt: skip
    if others := sorted(set(subdirs) - {d[0].name for d in named.values()}):  # dev/ of images: put
        held = [n + "/" for n in others if image_files(subdirs[n])]  # there by mistake, said
        notes.append(f"ignored folder(s) beside train/ in {root}: {', '.join(others)}" + (f" ({' '.join(held)} holds images, not a folder per class as a split does)" if held else ""))  # fmt: skip
    classes = _class_dirs(named["train"][0], notes)
    splits = {k: _folder_split(d[0], classes, notes) for k, d in named.items()}
    return classes, classes, splits, None, 3


def existing_dir(path: str) -> Path:
    if not (p := Path(path).expanduser()).exists():
        raise UserError(f"dataset path does not exist: {path}")
    if not p.is_dir():
        raise UserError(f"dataset path is not a folder: {path}")
    return p


JUNK_DIRS = {"__MACOSX", "__pycache__"}  # what zip tools and Python leave behind


def hidden_name(name: str) -> bool:
    return name.startswith(".") or name in JUNK_DIRS


def visible_dirs(path: Path, notes: list[str] | None = None) -> list[Path]:
    """Sub-folders, skipping hidden ones (.ipynb_checkpoints, __MACOSX: never classes; _background
    is a class) and transferlab's own (a run, a study: its marker; one written there became a
    class of its plots), said in `notes`."""
    dirs = sorted(d for d in path.iterdir() if d.is_dir())
    hidden = [d.name for d in dirs if hidden_name(d.name)]
    ours = [d.name for d in dirs if not hidden_name(d.name) and _marked(d)]
    if notes is not None:
        for names, what in ((hidden, "hidden folder(s)"), (ours, "transferlab output folder(s)")):
            if names:
                notes.append(f"skipped {what} in {path}: {', '.join(names)}")
    return [d for d in dirs if d.name not in hidden + ours]


def _marked(folder: Path) -> bool:
    """A folder transferlab wrote: its marker is transferlab's JSON (a user's .transferlab file keeps the class)."""
    try:
        mark = json.loads((folder / outputs.MARK).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and "kind" in mark


def image_files(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))  # fmt: skip


def _no_broken_class(root: Path) -> None:
    """A class folder that is a broken link (a drive not mounted) or a link loop is refused: it
    was dropped without a word. A link named as a file is (README.md) is left as files are."""
    for d in (d for d in root.iterdir() if d.is_symlink() and not d.exists() and not hidden_name(d.name) and not d.suffix):  # fmt: skip
        why = "a link loop" if _errno(d) == errno.ELOOP else f"a broken link to {os.readlink(d)}"
        raise UserError(f"{d} is {why}: a class folder that is not there; mend the link (a drive not mounted?) or remove it")  # fmt: skip


def _errno(path: Path) -> int:
    """The error number stat'ing `path` gives (ELOOP: a link loop), 0 if none."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno
    return 0


def _class_dirs(root: Path, notes: list[str]) -> list[str]:
    _no_broken_class(root)
    classes = [d.name for d in visible_dirs(root)]
    if not classes:
        raise UserError(f"no class folders in {root}")
    if odd := [c for c in classes if outputs.not_utf8(c)]:
        raise UserError(f"{root}: class folder {odd[0].encode(errors='surrogateescape').decode(errors='backslashreplace')} is not named in UTF-8 (an archive from another system?): rename it, e.g. convmv -f latin1 -t utf8 -r --notest {root}")  # fmt: skip
    if blank := [c for c in classes if not c.strip()]:  # shown as an empty label everywhere
        raise UserError(f"{root}: class folder {blank[0]!r} is named only with spaces: rename it to the class's name")  # fmt: skip
    return classes


def _folder_split(root: Path, classes: list[str], notes: list[str]) -> Split:
    _no_broken_class(root)
    found = [d.name for d in visible_dirs(root, notes)]
    if set(found) != set(classes):
        extra, missing = ([repr(c) if c != c.strip() else c for c in sorted(side)] for side in (set(found) - set(classes), set(classes) - set(found)))  # fmt: skip
        said = "; ".join([f"extra {', '.join(extra)}"] * bool(extra) + [f"missing {', '.join(missing)}"] * bool(missing))  # fmt: skip
        case = " (they differ only in case)" * ({c.casefold() for c in extra} == {c.casefold() for c in missing})  # fmt: skip
        mend = "name its class folders as train's" if extra else "add images of them"  # (66)
        raise UserError(f"{root} has different classes from train: {said}{case}: {mend}, or move it out of the data (the split is then carved from train)")  # fmt: skip
    paths, labels = [], []
    left: dict[str, list[str]] = {"hidden": [], "other": [], "folder": []}  # what is not read
    for i, name in enumerate(classes):
        files = image_files(root / name)
        if not files:  # (or they lie a folder below)
            raise UserError(_no_images(root, name, len(classes) == 1))
        paths += files
        labels += [i] * len(files)
        for f in (root / name).iterdir():
            kind = "folder" if f.is_dir() else "hidden" if f.name.startswith(".") else "other"
            if str(f) not in files:
                left[kind].append(f"{name}/{f.name}")
    for kind, why in [
        ("other", f"that are not images (by extension, one of {' '.join(sorted(IMAGE_EXTENSIONS))})"),
        ("hidden", "that are hidden (their names begin with a dot)"),
        ("folder", "inside class folders (a class's images are read from its folder, not below)"),
    ]:  # fmt: skip
        if left[kind]:
            names = sorted(left[kind])
            more = " ..." if len(names) > 5 else ""
            what = "folder(s)" if kind == "folder" else "file(s)"
            notes.append(
                f"skipped {len(names)} {what} in {root} {why}: {', '.join(names[:5])}{more}"
            )
    return Split(np.array(labels, dtype=np.int64), paths=paths)


def _no_images(root: Path, name: str, alone: bool) -> str:
    subs = ", ".join(sorted(d.name for d in visible_dirs(root / name, [])))
    where = f"{root} holds one folder, {name}, which holds folders ({subs}): if they are the "
    where += f"class folders, point --data at {root / name}"
    below = f"class folder {root / name} has no images, only folders ({subs}): a class's images "
    below += "are read from its own folder, not below; move them up into it"
    return (where if alone else below) if subs else f"class folder has no images: {root / name}"
