"""Predict image files and folders (or, from Python, PIL images and arrays) with a trained run
or an ensemble: top-k class names.

Each model sees the images through its own preprocessing (size, channels, normalisation), so an
ensemble of members with different input sizes predicts the same files as any single run.
Unreadable files are reported and skipped; the rest are predicted.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from . import checkpoint, combiners, data, decoding, ensembles, evaluate, members, models
from .classfolders import hidden_name
from .config import UnreadableImages, UserError, few, one_line


def image_files(inputs: list[str]) -> list[str]:
    """Files as given, folders searched recursively for images (sorted)."""
    from . import outputs

    files = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir() and (mark := outputs.read_mark(p)):  # `predict RUN OTHER_RUN`: its plots
            raise UserError(
                f"{item} is a transferlab {mark.get('kind', 'output')} folder, not images: "
                "predict takes one run or ensemble, then image files and folders"
            )
        if p.is_dir():
            found = sorted(
                f
                for f in _under(p)
                if f.suffix.lower() in data.IMAGE_EXTENSIONS
                and not f.name.startswith(".")
                and (f.is_file() or not f.exists())  # a pipe named x.png blocked the read
            )  # forever; x.png/ is a folder; a broken link is listed, then skipped with a line
            ours = {d for d in {f.parent for f in found} if _in_ours(d, p)}
            kept = [f for f in found if f.parent not in ours]
            if len(kept) < len(found):  # runs' plots and overlays among the photos: not photos
                print(f"note: skipped {len(found) - len(kept)} image(s) in transferlab output "
                      f"folders under {item} (runs' plots)", file=sys.stderr)  # fmt: skip
            found = kept
            if not found:
                raise UserError(f"no images found under {p}")
            files += [str(f) for f in found]
        elif p.is_file():
            files.append(str(p))
        else:
            what = "not a regular file or folder" if p.exists() else "no such file or folder"
            raise UserError(f"{what}: {item}")
    return files


def _under(top: Path) -> list[Path]:
    """Every file under `top`: linked folders followed, each real folder once (a link loop
    ends); hidden and junk folders (.ipynb_checkpoints, __MACOSX) not searched, as --data."""
    seen, found = set(), []
    for root, dirs, names in os.walk(top, followlinks=True):
        if (real := os.path.realpath(root)) in seen:
            dirs[:] = []
            continue
        seen.add(real)
        kept = (d for d in dirs if not hidden_name(d))  # real folders before links to them
        dirs[:] = sorted(kept, key=lambda d: (os.path.islink(os.path.join(root, d)), d))
        found += [Path(root, n) for n in names]
    return found


def _in_ours(folder: Path, top: Path) -> bool:
    """`folder`, or a folder between it and `top`, is one transferlab wrote (a run's plots)."""
    from . import outputs

    return any(
        outputs.read_mark(d) for d in [folder, *folder.parents] if d != top and top in d.parents
    )


def items(inputs: list) -> list:
    """Files (folders searched) and in-memory images, in the order given: file paths as str,
    PIL images, and arrays as PIL images (uint8, or float in [0, 1]; (H, W), (H, W, C) or a
    batch (N, H, W[, C]))."""
    out = []
    for x in inputs:
        if isinstance(x, (str, os.PathLike)):
            out += image_files([os.fspath(x)])
        elif isinstance(x, Image.Image):
            out.append(x)
        else:
            arr = as_uint8(x)
            batch = arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4))
            if batch and arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4):
                raise UserError(
                    f"an image array of shape {arr.shape} is ambiguous (one channels-first image, "
                    f"or {arr.shape[0]} gray ones?): give (H, W, C), or (N, H, W, 1) for gray images"
                )
            if arr.ndim == 4 and arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                raise UserError(f"a batch of shape {arr.shape} looks channels-first (N, C, H, W), as torch holds images: give (N, H, W, C), e.g. x.permute(0, 2, 3, 1)")  # fmt: skip
            out += [_pil(a) for a in arr] if batch else [_pil(arr)]
    if not out:
        raise UserError("nothing to predict: give image files, folders, PIL images or arrays")
    first: dict[str, int] = {}  # a file named twice, or named and inside a named folder: once
    kept = [i for i, x in enumerate(out) if not isinstance(x, str) or first.setdefault(_key(x), i) == i]  # fmt: skip
    once = [out[i] for i in kept]
    if len(once) < len(out):  # (its rows were repeated in the table, CSV and JSON; pass 62: a
        times = collections.Counter(_key(x) for x in out if isinstance(x, str))  # link's row
        was = {i: out[first[_key(out[i])]] for i in sorted(set(range(len(out))) - set(kept))}  # went unsaid)  # fmt: skip
        left = [out[i] if os.path.normpath(out[i]) == os.path.normpath(f) else f"{out[i]} (as {f})" for i, f in was.items()]  # fmt: skip
        print(f"note: {sum(n > 1 for n in times.values())} image(s) given more than once ({len(left)} repeat(s) left out: {few(list(dict.fromkeys(left)))}) are predicted once, by the first name given", file=sys.stderr)  # fmt: skip
    return once


def _key(path: str) -> str:
    """One file whatever it was called by: ./x.png, x.png, a link to it."""
    return os.path.realpath(path)


def as_uint8(x) -> np.ndarray:
    if not hasattr(x, "__array__"):
        raise UserError(
            f"cannot predict a {type(x).__name__}: give file paths, folders, PIL images or arrays"
        )
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise UserError("float image arrays must hold values in [0, 1] (uint8: 0-255)")
        return (arr * 255).round().astype(np.uint8)
    if arr.dtype != np.uint8:
        raise UserError(f"image arrays must be uint8 or float in [0, 1], not {arr.dtype}")
    return arr


def _pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1 or arr.shape[2:] not in ((), (2,), (3,), (4,)):  # fmt: skip
        raise UserError(f"an image array is (H, W) or (H, W, C) with 1-4 channels, got shape {arr.shape}")  # fmt: skip
    return Image.fromarray(arr)


def _in_memory(im: Image.Image, i: int, prep: models.Preprocessing) -> np.ndarray:
    """An in-memory image as the model sees it, or one line saying why it cannot be (a closed,
    truncated or empty image was Pillow's own exception)."""
    try:
        if min(im.size) < 1:
            raise ValueError(f"it is {im.size[0]}x{im.size[1]} pixels")
        im = decoding.resize(decoding.sane(im, prep.channels), prep.input_size, prep.interpolation)
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"image {i} of those given cannot be read: {' '.join(str(err).split()) or type(err).__name__}") from None  # fmt: skip
    return np.asarray(im, dtype=np.uint8).reshape(prep.input_size, prep.input_size, -1)


def _decode(files: list, prep: models.Preprocessing, quiet: bool) -> tuple[np.ndarray, list, list]:
    """Files through the checked decoder (unreadable ones listed), in-memory images as given."""
    paths = [f for f in files if isinstance(f, str)]
    split = data.Split(np.zeros(len(paths), dtype=np.int64), paths=paths)
    decoded, kept, bad = decoding.decode_checked(
        split, prep.input_size, prep.channels, prep.interpolation, True, "decode", quiet
    )
    by_path = dict(zip(kept.paths, decoded, strict=True))
    out, names = [], []
    for i, f in enumerate(files):
        if isinstance(f, str) and f not in by_path:
            continue
        names.append(f)
        out.append(by_path[f] if isinstance(f, str) else _in_memory(f, i, prep))
    shape = (0, prep.input_size, prep.input_size, prep.channels)
    return (np.stack(out) if out else np.zeros(shape, np.uint8)), names, bad


def _member(model, meta: dict, files: list, tta: str, quiet: bool):
    """(log-probs (N, K) in the run's class order, pooled features (N, F), kept files, bad)."""
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
    images, kept, bad = _decode(files, prep, quiet)
    if not kept:
        raise UserError("no readable images: " + UnreadableImages.some(bad))
    feats = evaluate.predict(
        model,
        images,
        prep,
        evaluate.inference_precision(meta.get("precision", "fp32")),
        meta.get("eval_batch_size", 256),
        "predict",
        quiet,
        pre_logits=True,
        tta=tta,
    )
    return evaluate.log_softmax(evaluate.head_logits(model, feats)), feats, kept, bad


class Predictor:
    """A run or an ensemble, its models loaded once: images (files, PIL images) -> top-k rows.

    `tta`: for a run, None means none; an ensemble predicts with the TTA it was built with."""

    def __init__(self, path: str | Path, tta: str | None = None):
        self.path = Path(path)
        if ensembles.is_ensemble(path):
            info = ensembles.read(path)
            runs = [m["run"] for m in info["members"]]
            self.metas = members.check_members(info, path)
            self.orders = members.check_classes(self.metas, runs)
            self.tta = ensembles.own_tta(self.path, info, tta)
            self.method, self.params = info["method"], ensembles.read_params(path, info)
            self.classes, self.names = info["classes"], info["class_names"]
        else:
            meta = checkpoint.read_meta(path)
            runs, self.metas, self.tta, self.method = [path], [meta], tta or "none", None
            self.orders = [np.arange(len(meta["classes"]))]
            self.classes, self.names = meta["classes"], meta["class_names"]
        for run, meta in zip(runs, self.metas, strict=True):
            evaluate.check_tta(self.tta, meta["preprocessing"]["input_size"], f"run {run}")
        for said in evaluate.mirror_notes(self.tta, runs, self.metas):  # (an ensemble's own too)
            print(f"note: {said}", file=sys.stderr)
        self.models = [
            evaluate.load_run_model(r, m, scoring=True)
            for r, m in zip(runs, self.metas, strict=True)
        ]

    def log_probs(self, files: list, quiet: bool = True) -> tuple[np.ndarray, list, list[str]]:
        """(N, K) log-probs of the readable inputs, those inputs, one line per skipped file."""
        logp, feats, bad = [], [], []
        for model, meta, order in zip(self.models, self.metas, self.orders, strict=True):
            lp, f, files, skipped = _member(model, meta, files, self.tta, quiet)  # kept only
            logp.append(lp[:, order])
            feats.append(f)
            bad += skipped
        if self.method is None:
            return logp[0], files, bad
        combined = combiners.combine(self.method, np.stack(logp), self.params, np.hstack(feats))
        return combined, files, bad

    def rows(self, files: list, top_k: int = 5, quiet: bool = True) -> tuple[list[dict], list[str]]:
        """Top-k rows (top_k checked by the caller: `predict`, the server) and skipped files."""
        combined, files, bad = self.log_probs(files, quiet)
        prob = np.exp(combined)
        k = min(top_k, prob.shape[1])
        top = np.argsort(-prob, axis=1)[:, :k]
        rows = [
            {
                "path": f if isinstance(f, str) else f"<image {i}>",
                "predictions": [
                    {"class": self.classes[j], "name": self.names[j], "prob": float(prob[i, j])}
                    for j in top[i]
                ],
            }
            for i, f in enumerate(files)
        ]
        return rows, bad


def predict(
    path: str | Path,
    inputs: list[str],
    top_k: int = 5,
    tta: str | None = None,
    quiet: bool = False,
) -> tuple[list[dict], list[str]]:
    """Top-k predictions per readable image; returns (rows, one line per skipped file).

    `tta`: for a run, None means none; an ensemble predicts with the TTA it was built with.
    """
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    files = items(inputs)
    return Predictor(path, tta).rows(files, top_k, quiet)


def table(rows: list[dict]) -> str:
    """An aligned text table: the file, then 'name prob' per rank."""
    if not rows:
        return "(no readable images)"
    k = len(rows[0]["predictions"])
    cells = [["file"] + [f"top-{r + 1}" for r in range(k)]]
    cells += [
        [one_line(row["path"])]
        + [f"{one_line(p['name'])} {p['prob']:.3f}" for p in row["predictions"]]
        for row in rows  # (a newline in a file name: escaped, the row kept whole)
    ]
    widths = [max(width(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c + " " * (w - width(c)) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in cells
    )


def width(text: str) -> int:
    """Columns on a terminal: wide (CJK, emoji) characters take two (len() counted one), a
    combining accent none (é typed on macOS: e and its accent)."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)  # fmt: skip


def csv_text(rows: list[dict]) -> str:
    """The predictions as CSV, each cell safe to open in a spreadsheet (report.spreadsheet_safe:
    a class or file named =HYPERLINK(...) was a live formula)."""
    import csv
    import io

    from .report import spreadsheet_safe  # (report imports ensembles, as this module does)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "rank", "class", "name", "prob"])
    for row in rows:
        for rank, p in enumerate(row["predictions"], 1):
            cells = [utf8(row["path"]), rank, p["class"], p["name"], f"{p['prob']:.6f}"]
            writer.writerow(map(spreadsheet_safe, cells))
    return buf.getvalue()


def json_text(rows: list[dict]) -> str:
    """The predictions as one JSON list. A file name whose bytes are not UTF-8 is written with
    its odd bytes as `\\xff`: as the lone surrogate Python holds (`\\udcff`), strict JSON readers
    refused the whole list."""
    import json

    return json.dumps([row | {"path": utf8(row["path"])} for row in rows], indent=1)


def utf8(name: str) -> str:
    """A file name as UTF-8 text: a byte that is not UTF-8 as `\\xff` (the CSV held the raw
    byte, which pandas refused; JSON held the lone surrogate)."""
    return name.encode(errors="surrogateescape").decode(errors="backslashreplace")


def escaped(rows: list[dict]) -> list[str]:
    """The note of file names written with `\\xff` for a byte that is not UTF-8 (`utf8`): said,
    as a name holding a backslash and "xff" of its own reads alike (pass 54)."""
    from .outputs import not_utf8

    odd = [utf8(r["path"]) for r in rows if not_utf8(r["path"])]
    clash = sorted(set(odd) & {r["path"] for r in rows})  # (pass 56, 57: `caf\\xe9.png` itself)
    alike = f"; {clash[0]} is also the name of another file, so their rows read alike: rename one" if clash else ""  # fmt: skip
    return [f"note: {len(odd)} file name(s) hold bytes that are not UTF-8, each such byte written as \\xNN: {', '.join(odd[:3])}{', ...' * (len(odd) > 3)}{alike}"] * bool(odd)  # fmt: skip
