"""Dataset sources and splits: every source yields class ids in a fixed order, human-readable
names, and three splits — train, val and test — as file paths or in-memory arrays, with a
fingerprint of what they hold. A split the source gives is used as given; a missing test split
is TEST_FRACTION of train held out, a missing val split --val-fraction of the rest (val is
never carved from test). Each path source has its module (`_elsewhere`); decoding is in
`decoding`, training batches in `batching`."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .config import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}  # fmt: skip
SPLIT_SEED = 0  # splits never depend on a run's seed, so every run of a dataset shares them
TEST_FRACTION = 0.2  # held-out share when a source has no test split of its own


@dataclass
class Split:
    """One split: labels plus image paths, an in-memory uint8 array (N, H, W, C), or members of
    WebDataset shards: (shard, offset, size) rows, the shard files in `shards` (shards.py)."""

    labels: np.ndarray  # (N,) int64
    paths: list[str] | None = None
    arrays: np.ndarray | None = None
    members: np.ndarray | None = None
    shards: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        paths = [self.paths[i] for i in idx] if self.paths is not None else None
        pick = [a[idx] if a is not None else None for a in (self.arrays, self.members)]
        return Split(self.labels[idx], paths, *pick, self.shards)


@dataclass
class Dataset:
    spec: str  # the spec it was loaded from, e.g. "tiny-imagenet:/data/tiny-imagenet-200"
    classes: list[str]  # stable class ids (WordNet ids, folder names, digits)
    names: list[str]  # human-readable class names, same order
    splits: dict[str, Split]  # train, val, test
    native_size: int  # the images' own size (used for models trained from scratch)
    native_channels: int  # 1 for grayscale sources, else 3
    fingerprint: str = ""  # sha256 of every split's (relative path or pixels, label)
    notes: tuple[str, ...] = ()  # what loading skipped (folders, files), to be printed

    @property
    def symbols(self) -> bool:
        """Greyscale and 32 px or less, like digits and letters: a mirror reads as another."""
        return self.native_channels == 1 and self.native_size <= 32


# ----------------------------------------------------------------------------- sources


PATH_KINDS = ("tiny-imagenet", "folder", "csv", "wds")  # specs whose argument is a path
# the split names Hugging Face datasets reads (data_files.SPLIT_KEYWORDS): folders, CSV, hf: alike
SPLIT_NAMES = {w: k for k, ws in {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}.items() for w in ws}  # fmt: skip


def canonical(spec: str) -> str:
    """The spec with its path made absolute, so a run's record of its data holds from any cwd."""
    kind, _, arg = str(spec).partition(":")
    if kind in PATH_KINDS and arg:
        return f"{kind}:{Path(arg).expanduser().resolve()}"
    if kind == "hf":
        from . import hfdata

        name, config, options = hfdata.parse(arg)
        if name and Path(name).expanduser().exists():  # a local dataset
            return hfdata.spec_of(str(Path(name).expanduser().resolve()), config, options)
    return kind if kind == "synthetic" and not arg else str(spec)  # (pass 47: two datasets)


def data_root(spec: str) -> Path | None:
    """The folder a path spec's images live in (a CSV's own folder), None for in-memory data."""
    kind, _, arg = str(spec).partition(":")
    if kind == "hf" and arg:  # where its images are written out
        from . import hfdata

        name, config, _ = hfdata.parse(arg)
        return hfdata.root(name, config)
    if kind not in PATH_KINDS or not arg:
        return None
    path = Path(arg).expanduser()
    return path.parent if kind == "csv" else path


def check_spec(spec: str, exists: bool = True) -> None:
    """The mistakes a spec can show without reading it: an unknown kind, a missing path
    (`exists`: checked to exist too)."""
    kind, _, arg = str(spec).partition(":")
    if kind not in SOURCES and Path(spec).is_symlink() and not Path(spec).exists():  # (pass 49)
        raise UserError(f"{spec} is a broken link to {os.readlink(spec)}: mend it, or give --data a folder or file that is there")  # fmt: skip
    if kind not in SOURCES:
        raise UserError(f"unknown dataset kind '{kind}'{f' in {spec!r}' * (spec != kind)} (known: {', '.join(SOURCES)}){_meant(spec)}")  # fmt: skip
    if kind == "digits" and kind != spec:  # (digits:~/mnist trained on the 8x8 digits, unsaid)
        raise UserError(f"'{spec}': digits is scikit-learn's bundled 8x8 digits and takes no path: --data digits (your own images: folder:PATH)")  # fmt: skip
    if kind in PATH_KINDS and not arg:
        raise UserError(f"dataset '{kind}' needs a path: {kind}:PATH")
    if exists and kind in PATH_KINDS and not Path(arg).expanduser().exists():
        raise UserError(f"dataset path does not exist: {arg}")


def _meant(spec: str) -> str:
    """What a bare path given as --data may have meant, said after its refusal ('': not a path)."""
    path, marks = Path(spec).expanduser(), {"wnids.txt": "tiny-imagenet", "shards.json": "wds", "dataset_dict.json": "hf", "state.json": "hf"}  # fmt: skip
    kind, colon, arg = spec.partition(":")
    close = [k for k in SOURCES if k == kind.casefold()] or difflib.get_close_matches(kind, SOURCES, 1, 0.8)  # fmt: skip
    if close and not path.exists():  # Digits, Folder:x, folde:x, digts (a folder digts: below)
        return f": did you mean {close[0]}{colon}{arg}?"
    if path.is_file() and path.suffix.lower() in (".csv", ".tar"):  # (wds: the folder of shards)
        return f": did you mean csv:{spec}?" if path.suffix.lower() == ".csv" else ": wds:PATH takes the folder transferlab data shard wrote (its shards.json beside the .tar files), not one .tar"  # fmt: skip
    if not path.is_dir():  # (a path, not a kind: that it does not exist either)
        return "" if colon or path.exists() else f": and no file or folder {spec} exists"
    if kind := next((kind for name, kind in marks.items() if (path / name).is_file()), None):
        return f": did you mean {kind}:{spec}?"
    from .classfolders import image_files, visible_dirs  # (it imports this module)

    if os.access(path, os.R_OK | os.X_OK) and not visible_dirs(path):  # (.ipynb_checkpoints)
        return f": {spec} holds no class folders (folder:PATH takes a folder of one folder per class{f'; to classify images: transferlab predict RUN {spec}' if image_files(path) else ', and it holds no images either'})"  # fmt: skip
    return f": did you mean folder:{spec}?"


def load(spec: str, val_fraction: float = 0.1, limit: int | None = None, fold: str = "none", scoring: bool = False) -> Dataset:  # fmt: skip
    """Load a dataset spec (`digits`, `folder:PATH`, ...); `fold` "i/k": val is fold i of k of
    train+val, train the rest, test unchanged (`folds.fold_splits`); `scoring`: data a run is
    scored on, not trained on (its refusals say so)."""
    check_spec(spec, exists=False)
    kind, _, arg = str(spec).partition(":")
    notes: list[str] = []
    classes, names, given, native_size_, channels = SOURCES[kind](arg, notes)
    key = {c: unicodedata.normalize("NFKC", c).casefold() for c in classes}  # Cat, cat; café
    alike = Counter(key.values())  # typed on macOS (NFD) and elsewhere: folders kept apart, said
    if twins := sorted(c for c in classes if alike[key[c]] > 1):  # (a CSV's labels: NFC, one)
        nfc = [unicodedata.normalize("NFC", c) for c in twins]  # (=1 and ＝1 were "in case")
        case = len(set(nfc)) == len(twins) and min(Counter(c.casefold() for c in nfc).values()) > 1  # fmt: skip
        how, shown = ("case", twins) if case else ("Unicode form, width or case", map(ascii, twins))
        notes.append(f"class names that differ only in {how} are separate classes: {', '.join(shown)}")  # fmt: skip
    numbers = Counter(float(c) for c in classes if re.fullmatch(NUMBER, c, re.I))
    if twins := sorted((c for c in classes if re.fullmatch(NUMBER, c, re.I) and numbers[float(c)] > 1), key=float):  # fmt: skip
        notes.append(f"class names that are one number written two ways are separate classes: {', '.join(twins)}")  # fmt: skip
    if len(classes) == 1 and scoring:  # restricted to the data's classes, every image is right
        raise UserError(f"{spec} holds one class ({classes[0]}): a run is scored over the classes its data holds, so on one class every image would be right; to see what the run calls them: transferlab predict RUN {arg if kind == 'folder' else 'IMAGES'}")  # fmt: skip
    if len(classes) < 2:
        fix = {"csv": "its label column holds one value: label the images of at least two classes", "hf": "its label column holds one value: name another with label=COLUMN, or label at least two classes"}.get(kind, "point --data at the folder that holds the class folders")  # fmt: skip
        raise UserError(f"{spec} has {len(classes)} class ({', '.join(classes)}); a classifier needs at least two: {fix}")  # fmt: skip
    given, origin = hold_out_test(given)
    if native_size_ is None:  # the median image of train (before val is carved from it)
        native_size_ = native_size(given["train"].paths)
    splits = carve_val(given, origin, val_fraction)
    if fold != "none":
        from .folds import fold_splits  # (folds imports data)

        splits = fold_splits(splits, fold)
        origin["val"], origin["train"] = f"fold {fold} of train+val", "the other folds"
    if limit:  # its test score is on part of the test split: said, recorded, marked (report)
        origin = {k: f"{v}; --limit {limit}" if len(splits[k]) > limit else v for k, v in origin.items()}  # (pass 47: 10% of train)  # fmt: skip
        n_test, splits = len(splits["test"]), {k: v.subset(stratified_head(v.labels, limit)) for k, v in splits.items()}  # fmt: skip
        notes += [f"test score on {len(splits['test'])} of the {n_test} test images: --limit {limit}"] * (len(splits["test"]) < n_test)  # fmt: skip
    notes.append("splits: " + ", ".join(f"{k} {len(splits[k])} ({origin[k]})" for k in splits))
    few = f"--limit {limit}, under the {len(classes)} classes" if limit and limit < len(classes) else "too few images"  # fmt: skip
    for name in ("train", "val", "test"):
        absent = sorted(set(range(len(classes))) - set(splits[name].labels.tolist()))
        if absent:
            notes.append(f"{len(absent)} class(es) have no {name} image ({few}): " + ", ".join(classes[i] for i in absent[:5]) + (" ..." if len(absent) > 5 else ""))  # fmt: skip
    root = data_root(spec)
    return Dataset(canonical(spec), classes, names, splits, native_size_, channels, fingerprint(splits, root), tuple(notes))  # fmt: skip


def hold_out_test(given: dict[str, Split]) -> tuple[dict, dict]:
    """The source's test split, or TEST_FRACTION of its train held out (seeded, stratified)."""
    given, origin = dict(given), {k: "given" for k in given}
    if "test" not in given:
        given["train"], given["test"] = carve(given["train"], TEST_FRACTION)
        origin["test"], origin["train"] = f"{TEST_FRACTION:.0%} of train held out{_raised(given, 'test', TEST_FRACTION)}", "what remains"  # fmt: skip
    return given, origin


def carve_val(given: dict[str, Split], origin: dict, val_fraction: float) -> dict:
    """The source's val split, or `val_fraction` of train (never of test)."""
    if "val" not in given:
        given["train"], given["val"] = carve(given["train"], val_fraction)
        origin["val"], origin["train"] = f"{val_fraction * 100:.3g}% of train by --val-fraction{_raised(given, 'val', val_fraction)}", "what remains"  # fmt: skip
    return {k: given[k] for k in ("train", "val", "test")}


def _raised(given: dict[str, Split], held: str, fraction: float) -> str:
    """What `carve` held out beyond `fraction`, to give each class one image (it said 10% of a
    train split whose val was 33%)."""
    n, of = len(given[held]), len(given[held]) + len(given["train"])
    return f", raised to {n / of:.0%} for one image of each class" if n > np.ceil(fraction * of) else ""  # fmt: skip


NUMBER = r"[-+]?([0-9]*\.?[0-9]+(e[-+]?[0-9]+)?|inf|infinity|nan)"  # a label that is a number


def label_order(labels, where: str = "the data") -> list[str]:
    """Class names sorted, numbers in numeric order (-1, 2, 10; "01" before "1": ties by text).
    Numbers not whole are refused: a measurement (0.37, 1.52, inf) is not a class, and each
    value became one (20 images, 19 classes, trained without a word)."""
    if labels and all(re.fullmatch(NUMBER, c, re.I) for c in labels):
        if fractional := sorted(c for c in labels if not float(c).is_integer()):
            raise UserError(f"{where}: its labels are numbers, some not whole ({', '.join(fractional[:3])}{', ...' if len(fractional) > 3 else ''}; {len(labels)} distinct): transferlab classifies images into classes, and a measurement is not one; label each image with its class (a name, or a whole number)")  # fmt: skip
    return sorted(labels, key=lambda c: (0, int(c), c) if re.fullmatch(r"-?[0-9]+", c) else (1, c))


def fingerprint(splits: dict[str, Split], root: Path | None) -> str:
    """What the splits hold: file paths relative to the data root (so a moved dataset keeps
    its fingerprint) or in-memory pixels, with their labels. Cheap: no image is read."""
    h = hashlib.sha256()
    for name in sorted(splits):
        split = splits[name]
        h.update(f"{name}\0{len(split)}\0".encode())
        h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
        for path in split.paths if split.paths is not None else split.shards:
            rel = os.path.relpath(path, root) if root is not None else path
            h.update(rel.encode(errors="surrogateescape") + b"\n")
        pixels = split.arrays if split.paths is None else None
        h.update(b"" if pixels is None else np.ascontiguousarray(pixels).tobytes())
        h.update(b"" if split.members is None else np.ascontiguousarray(split.members).tobytes())
    return h.hexdigest()[:16]


def _digits(_: str, notes: list[str]):
    from sklearn.datasets import load_digits

    if Path("digits").is_dir():  # (pass 48: `--data digits` beside your folder digits/)
        notes.append("--data digits is scikit-learn's bundled 8x8 digits; for the folder digits/ here: --data folder:digits")  # fmt: skip

    bunch = load_digits()
    arrays = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    everything = Split(bunch.target.astype(np.int64), arrays=arrays)
    classes = [str(c) for c in bunch.target_names]
    return classes, classes, {"train": everything}, 8, 1


def _synthetic(arg: str, notes: list[str]):
    """`synthetic:N` or `synthetic:NxSIZE`: N random RGB images whose class is the colour of
    a central square (10 classes), made in memory; for benchmarks and smoke tests."""
    match = re.fullmatch(r"(?:([0-9]+)(?:x([0-9]+))?)?", arg)  # (x alone, 0, -5: pass 48)
    n, size = (int(match[1] or 2000), int(match[2] or 64)) if match else (0, 0)
    if n < 1 or size < 8:
        raise UserError(f"synthetic data is synthetic:N or synthetic:NxSIZE, N >= 1 images (of 10 classes) of SIZE >= 8 px, got '{arg}'")  # fmt: skip
    if n * size * size * 3 > 2**32:  # (made in memory: numpy's traceback, or the machine's)
        raise UserError(f"synthetic:{arg} would hold {n * size * size * 3 / 2**30:.3g} GiB of pixels in memory: at most 4 (N x SIZE x SIZE x 3 bytes)")  # fmt: skip
    rng = np.random.default_rng(SPLIT_SEED)
    labels = np.arange(n) % 10
    arrays = rng.integers(0, 80, (n, size, size, 3), dtype=np.uint8)
    colours = rng.integers(60, 255, (10, 3), dtype=np.uint8)
    q = size // 4
    arrays[:, q : size - q, q : size - q] = colours[labels][:, None, None, :]
    classes = [f"class{i}" for i in range(10)]
    return classes, classes, {"train": Split(labels.astype(np.int64), arrays=arrays)}, size, 3


def _elsewhere(module: str):
    """A source kept in its own module, imported only for its specs (folder: classfolders.py;
    csv: csvdata.py; hf: the optional datasets extra; wds: shards.py; tiny-imagenet: tinyimagenet.py; each imports this
    module)."""
    return lambda arg, notes: importlib.import_module(f".{module}", __package__).source(arg, notes)


SOURCES = {"digits": _digits, "tiny-imagenet": _elsewhere("tinyimagenet"), "folder": _elsewhere("classfolders"), "csv": _elsewhere("csvdata"),
           "hf": _elsewhere("hfdata"), "wds": _elsewhere("shards"), "synthetic": _synthetic}  # fmt: skip


NATIVE_SAMPLE = 64  # files whose sizes decide a folder's native size


def native_size(paths: list[str]) -> int:
    """The median shorter side of up to NATIVE_SAMPLE files spread over the list: one odd file
    (a 1x1 thumbnail, a 4000 px photo) does not decide it. Unreadable files are skipped here
    (decoding reports them); with none readable, 224."""
    from . import decoding

    picks = np.unique(np.linspace(0, len(paths) - 1, min(NATIVE_SAMPLE, len(paths))).astype(int))
    sides = []
    for i in picks:
        try:
            with Image.open(paths[i]) as im:
                sides.append(min(im.size))
        except decoding.UNREADABLE:
            continue
    return int(np.clip(np.median(sides), 8, 1024)) if sides else 224


# ----------------------------------------------------------------------------- splits


def carve(split: Split, fraction: float) -> tuple[Split, Split]:
    """Seeded stratified split of `split` into (rest, held-out fraction)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(split))
    counts = np.bincount(split.labels)
    n_classes = int((counts > 0).sum())
    n_held, stratify = max(1, int(np.ceil(fraction * len(idx)))), None
    if counts[counts > 0].min() >= 2:  # stratify, with at least one held-out image per class
        n_held, stratify = max(n_held, n_classes), split.labels
    if len(idx) - n_held < (n_classes if stratify is not None else 1):  # (sklearn's traceback)
        raise UserError(f"too few images ({len(idx)}) to hold out {fraction:.0%} of them and train on the rest (an image of each class): a smaller fraction, or give each class 3 or more (one each for train, val and test), or folders of train/ and test/ images")  # fmt: skip
    rest, held = train_test_split(idx, test_size=n_held, random_state=SPLIT_SEED, stratify=stratify)
    return split.subset(np.sort(rest)), split.subset(np.sort(held))


def stratified_head(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` samples, spread evenly over classes, seeded."""
    if limit >= len(labels):
        return np.arange(len(labels))
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)
    seen: dict[int, int] = {}
    for i in perm:  # rank of each sample within its class, in permuted order
        rank[i] = seen.get(labels[i], 0)
        seen[labels[i]] = rank[i] + 1
    order = perm[np.argsort(rank[perm], kind="stable")]
    return np.sort(order[:limit])
