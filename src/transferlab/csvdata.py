"""`--data csv:FILE`: one row per image, `file_name,label[,split]` (the column names of Hugging
Face imagefolder's metadata.csv), every mistake named by its line."""

from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path

import numpy as np

from .config import UserError
from .data import SPLIT_NAMES, Split, label_order

COLUMNS = ("file_name", "label", "split")  # in any case (a Split column was silently unused:
# its test rows were trained on)


def source(file: str, notes: list[str]):
    """One row per image: `file_name,label[,split]` (Hugging Face imagefolder's metadata.csv
    names), paths relative to the CSV; classes are the labels of the train rows, sorted."""
    path = Path(file).expanduser()
    columns, rows = _read(path, file)
    by_split: dict[str, list[tuple[str, str]]] = {}
    seen: dict[str, int] = {}  # image -> its line: one image in two rows (or splits) is a slip
    for n, row in rows:  # n: its line in the file (blank lines and quoted newlines counted)
        extra = [v for v in row.get(None) or [] if v.strip()]  # csv puts them under None
        if extra:
            raise UserError(
                f"{file} line {n}: more fields than the header's {len(columns)} ({extra[0]!r}); "
                "quote a file_name or label that holds a comma"
            )
        name, label = (row.get("file_name") or "").strip(), (row.get("label") or "").strip()
        label = unicodedata.normalize("NFC", label)  # café typed on macOS (NFD) and elsewhere
        raw = (row.get("split") or "").strip().lower() or "train"  # (" ": "split '' is not one of")
        if raw not in SPLIT_NAMES:
            raise UserError(f"{file} line {n}: split '{raw}' is not one of {', '.join(SPLIT_NAMES)}")  # fmt: skip
        if not name or not label:
            raise UserError(f"{file} line {n}: empty file_name or label")
        image = path.parent / name
        if not image.is_file():
            why = "is a folder, not an image" if image.is_dir() else "not found"
            if (row.get("file_name") or "") != name:
                why += " (spaces around a name are ignored)"
            if "\\" in name:
                why += "; separate folders with /"
            raise UserError(f"{file} line {n}: {name} {why} (paths are relative to the CSV)")
        st = image.stat()  # one file however it is reached (a link, a hard link)
        first = seen.setdefault((st.st_dev, st.st_ino), n)
        if first != n:
            raise UserError(f"{file} line {n}: {name} is on line {first} too; list each image once")
        by_split.setdefault(SPLIT_NAMES[raw], []).append((str(image), label, n))
    if "train" not in by_split:
        raise UserError(f"{file}: no train rows (rows without a split column value are train)")
    labels = {label for _, label, _ in by_split["train"]}
    # (labels that differ only in case: kept apart, as given, and said by data.load)
    classes = label_order(labels, str(file))
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, items in by_split.items():
        unknown = next(((n, lab) for _, lab, n in items if lab not in index), None)
        if unknown:
            raise UserError(
                f"{file} line {unknown[0]}: label '{unknown[1]}' of a {split} row has no train rows"
            )
        splits[split] = Split(
            np.array([index[lab] for _, lab, _ in items], dtype=np.int64),
            paths=[p for p, _, _ in items],
        )
    return classes, classes, splits, None, 3


def _read(path: Path, file: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """The CSV's column names (stripped) and (line, row) pairs, or one line saying why it
    cannot be read."""
    if path.is_dir():
        raise UserError(f"{file} is a folder, not a CSV file (a folder of class folders: "
                        f"folder:{file})")  # fmt: skip
    if not path.is_file():
        raise UserError(f"CSV file not found: {file}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise UserError(
            f"{file} is not UTF-8 text (byte {err.object[err.start]:#04x} at {err.start}): save "
            "it as UTF-8 (Excel: CSV UTF-8)"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]  # "a, b" too; Split or LABEL: a
    reader.fieldnames = columns = [c.lower() if c.lower() in COLUMNS else c for c in columns]
    missing = [c for c in ("file_name", "label") if c not in columns]
    if missing:
        other = any(c in "".join(columns) for c in ";\t")  # (a tab: pass 63)
        commas = "; separate the columns with commas" if other else ""
        raise UserError(
            f"{file}: no {' or '.join(missing)} column (found {', '.join(columns) or 'none'}); "
            f"a data CSV has columns file_name,label and optionally split{commas}"
        )
    twice = [c for c in COLUMNS if columns.count(c) > 1]
    if twice:  # DictReader would keep the last one, silently
        at = [str(i) for i, c in enumerate(columns, 1) if c == twice[0]]
        raise UserError(f"{file}: column {twice[0]} appears twice (columns {' and '.join(at)}): "
                        "keep one")  # fmt: skip
    return columns, [(reader.line_num, row) for row in reader]
